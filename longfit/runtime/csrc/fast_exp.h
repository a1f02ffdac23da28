/* e^x in fp32 as plain arithmetic that the compiler vectorizes (glibc's expf is one call per element), shared by the
 * attention's softmax (paged_decode.c, x <= 0) and the fused step's SiLU (decode_step.c).
 *
 * Cody-Waite reduction to r = x - n·ln2 in [-ln2/2, ln2/2], a degree-6 Taylor polynomial (truncation < 2^-26
 * there), times 2^n built in the exponent bits. Measured against double exp, built with the library's flags: within
 * 2.6e-7 relative for |x| <= 20, 4.4e-7 over [-87, 88] (-fassociative-math may merge the two reduction steps). x is
 * clamped to [-87, 88], where 2^n stays a normal float (so exp(-inf) is ~1e-38, not 0); NaN passes through the clamp
 * unchanged. */
#ifndef LONGFIT_FAST_EXP_H
#define LONGFIT_FAST_EXP_H
#include <math.h>
#include <stdint.h>

static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { uint32_t i; float f; } scale;
    scale.i = (uint32_t)((int32_t)n + 127) << 23;
    return p * scale.f;
}

#endif
