/* bf16 <-> fp32 conversions shared by the C kernels (qlinear.c, decode_step.c). */
#ifndef LONGFIT_BF16_H
#define LONGFIT_BF16_H
#include <stdint.h>

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t i; float f; } u;
    u.i = (uint32_t)h << 16;
    return u.f;
}

/* Round to nearest even, as torch's float -> bfloat16 conversion. */
static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t i; } u;
    u.f = f;
    if ((u.i & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u.i >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((u.i + 0x7fffu + ((u.i >> 16) & 1u)) >> 16);
}

#endif
