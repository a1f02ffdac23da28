/* Products of bf16 activations with int4 / int8 weights, for the few-row case (decode steps): y = x @ W^T.
 *
 * torch's CPU kernels (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm) convert each weight to float and reuse
 * nothing across rows; on one core they read SmolLM2's int4 layers at ~8 GB/s. Here the weights are stored in
 * tiles of 16 output rows so that one vector register holds 16 rows' codes at four or eight inputs (one 32-bit lane
 * per row): a weight vector is loaded once and multiplied by every activation row of the call.
 *
 * Work items are pairs of adjacent tiles (the last tile alone when their count is odd): two tiles give the loop
 * independent chains, and each pair is stored interleaved (below), so that an item, and the whole weight, is one
 * forward stream of memory, prefetched PREFETCH bytes ahead.
 *
 * 8-bit activations (AVX512-VNNI's vpdpbusd: four 8-bit products summed into each 32-bit lane). The int8 products,
 * and the int4 products of one row, split each row of x into integers, per block of B inputs (B = the group G for
 * int4, all of K for int8): x = s · (a + b / 254) + e with s = max|x| / 127, a = round(x / s),
 * b = round(254 · (x / s - a)), a and b in -127..127, so |e| ≤ s / 508 = max|x| / 64516 per input (plus fp32
 * rounding): ~15 bits of the block's range, finer than x's own bf16 rounding for the inputs that matter. So
 * |y - y_exact| ≤ max|x| / 64516 · Σ|w| per block, far below the bf16 output's 2^-9 in practice
 * (tests/unit/test_qlinear_tiles.py holds the kernels to this bound). A block whose Σ x is not finite (a NaN or an
 * infinity in it) gives NaN. The integer sums are exact; they become fp32 once per block.
 * Why: one row's product is mostly decoding, and the former kernels decoded int4 codes into bf16 pairs for
 * vdpbf16ps (7 vector ops per 64 bytes of codes, 3 here) and widened int8 codes to fp32 (12 ops per 64 bytes
 * against 2); they were near compute-bound on one Zen 4 core. scripts/kernel_stream.c, alternated with the former
 * kernels: int4 in L2 ~1.3x the weights per second, and from DRAM the int4 layers ~5-15% and the int8 head
 * ~10-25% more bytes per second, where both are close to a plain read (docs/PERFORMANCE.md).
 * With several rows the products dominate instead, and there the int4 products stay bf16 (q4_block_bf16 says why):
 * exact products of x as it is, fp32 sums.
 *
 * int4 (llama.cpp's Q4_1 form, exact for GGUF Q4_1): w[n, k] = code · d[n, g] + m[n, g], g = k / G, codes 0..15,
 * d and m fp16. A tile's oct o (inputs 8o..8o+7) is 64 bytes: 32-bit word i is row i's, and its byte e (e = 0..3)
 * holds the code of input 8o + e in its low 4 bits and that of input 8o + 4 + e in its high 4 bits. Codes
 * [N/16, K/8, 64] uint8 as memory, where a pair of tiles stores oct 0 of both tiles, then oct 1 of both, ...
 * (tt = 2 tiles per item; 1 for a last odd tile), and the parameters [N/16, K/G, 16] are interleaved the same way
 * per group. 8-bit path: a mask gives the four codes of inputs 8o..8o+3 as the unsigned bytes vpdpbusd takes, a
 * shift and a mask those of 8o+4..8o+7; per group y += d · s · (Σ code·a + Σ code·b / 254) + m · Σ x, Σ x summed
 * from x in fp32. Parameters fp16 (GGUF's own) or fp32 (where fp16 would round them: RTN parameters in bf16 whose
 * m needs more bits).
 *
 * int8 (per output channel): w[n, k] = code · s[n], codes -127..127, stored as code + 128 (vpdpbusd's unsigned
 * operand; the activations' integers are its signed one, and 128 · Σ a is taken off each sum). A tile's quad q
 * (inputs 4q..4q+3) is 64 bytes: row i's four codes at bytes 4i..4i+3 ([N/16, K/4, 64] uint8, pairs of tiles
 * interleaved per quad, as above). s [N] bf16.
 *
 * out [M, N] is fp32 or bf16 (round to nearest even). CPUs without AVX512-VNNI run plain C loops over the same
 * layouts that multiply x exactly in fp32 (vectorized by the compiler); with VNNI but without AVX512-BF16, every
 * int4 row takes the 8-bit path. Built and loaded by longfit/runtime/native.py, with paged_decode.c.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define HAVE_VNNI_PATH 1
#else
#define HAVE_VNNI_PATH 0
#endif
#if HAVE_VNNI_PATH && defined(__AVX512BF16__)
#define HAVE_BF16_PATH 1
#else
#define HAVE_BF16_PATH 0
#endif

#define LANES 16
#define MAX_MB 4 /* activation rows per register block */
#ifndef Q4_BF16_MIN_ROWS
#define Q4_BF16_MIN_ROWS 2 /* int4 products of this many rows on take bf16 products (q4_block_bf16 says why) */
#endif
#define MAX_GROUP 1024 /* inputs per int4 group that longfit_q4_dequantize takes */
#ifndef PREFETCH
/* Bytes ahead of the weight stream prefetched into L2 (0: none). The hardware prefetchers alone left the int4 layers
 * of a SmolLM2 step, read from DRAM, at ~10 GB/s on one core; 8 KiB ahead: ~14-16 GB/s (4 KiB: ~11). */
#define PREFETCH 8192
#endif

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    union { uint32_t i; float f; } u;
    if (exp == 0) { /* zero or subnormal: mant * 2^-24 */
        u.f = (float)mant * (1.0f / 16777216.0f);
        u.i |= sign;
        return u.f;
    }
    if (exp == 31) u.i = sign | 0x7f800000u | (mant << 13);
    else u.i = sign | ((exp + 112) << 23) | (mant << 13);
    return u.f;
}

static void store_row(void *out, int out_is_bf16, int64_t offset, const float *values, int64_t n) {
    if (out_is_bf16) {
        uint16_t *o = (uint16_t *)out + offset;
        for (int64_t i = 0; i < n; i++) o[i] = f32_to_bf16(values[i]);
    } else {
        memcpy((float *)out + offset, values, (size_t)n * sizeof(float));
    }
}

/* An item's results: acc [tt][MAX_MB][16] (tiles t0.. of rows m0..m0 + mb) into out [M, N]. */
static void store_item(void *out, int out_is_bf16, int64_t N, int64_t t0, int tt, int64_t m0, int64_t mb,
                       const float *acc) {
    for (int t = 0; t < tt; t++)
        for (int64_t r = 0; r < mb; r++)
            store_row(out, out_is_bf16, (m0 + r) * N + (t0 + t) * LANES, acc + (t * MAX_MB + r) * LANES, LANES);
}

static inline float param(const void *p, int64_t index, int f16) {
    return f16 ? f16_to_f32(((const uint16_t *)p)[index]) : ((const float *)p)[index];
}

#if HAVE_VNNI_PATH
/* x [M, K] bf16, per row and block of B inputs (K % B == 0): the split at the top, a and b [M, K] int8, s and the
 * exact Σ x [M, K/B] fp32, and Σ a, Σ b [M, K/B] int32 (the int8 kernel's offset). One allocation: free(s). */
typedef struct {
    int8_t *a, *b;
    float *s, *sum;
    int32_t *asum, *bsum;
} QuantizedRows;

static inline __m512 load_bf16(const uint16_t *p, __mmask16 mask) { /* 16 bf16 → fp32, masked lanes 0 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

static int quantize_rows(const uint16_t *x, int64_t M, int64_t K, int64_t B, QuantizedRows *q) {
    const int64_t blocks = M * (K / B);
    char *mem = (char *)malloc((size_t)(2 * M * K) + (size_t)blocks * 16);
    if (!mem) return -2;
    q->s = (float *)mem;
    q->sum = q->s + blocks;
    q->asum = (int32_t *)(q->sum + blocks);
    q->bsum = q->asum + blocks;
    q->a = (int8_t *)(q->bsum + blocks);
    q->b = q->a + M * K;
    const __m512 steps = _mm512_set1_ps(254.0f);
    for (int64_t blk = 0; blk < blocks; blk++) {
        const uint16_t *xb = x + blk * B;
        __m512 top_v = _mm512_setzero_ps(), sum_v = _mm512_setzero_ps();
        for (int64_t k = 0; k < B; k += 16) {
            const __m512 v = load_bf16(xb + k, B - k >= 16 ? 0xFFFF : (__mmask16)((1u << (B - k)) - 1));
            sum_v = _mm512_add_ps(sum_v, v);
            top_v = _mm512_max_ps(top_v, _mm512_abs_ps(v));
        }
        const float sum = _mm512_reduce_add_ps(sum_v), top = _mm512_reduce_max_ps(top_v);
        /* a NaN or an infinity makes Σ x non-finite: the block's results are then NaN, as an exact product's */
        const int finite = isfinite(sum);
        const __m512 inv = _mm512_set1_ps(finite && top > 0.0f ? 127.0f / top : 0.0f);
        __m512i asum = _mm512_setzero_si512(), bsum = _mm512_setzero_si512();
        for (int64_t k = 0; k < B; k += 16) {
            const __mmask16 mask = B - k >= 16 ? 0xFFFF : (__mmask16)((1u << (B - k)) - 1);
            const __m512 scaled = _mm512_mul_ps(load_bf16(xb + k, mask), inv);
            const __m512 a = _mm512_roundscale_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512i ai = _mm512_cvtps_epi32(a); /* exact: a is an integer */
            const __m512i bi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(scaled, a), steps)); /* to nearest */
            _mm512_mask_cvtepi32_storeu_epi8(q->a + blk * B + k, mask, ai);
            _mm512_mask_cvtepi32_storeu_epi8(q->b + blk * B + k, mask, bi);
            asum = _mm512_add_epi32(asum, ai);
            bsum = _mm512_add_epi32(bsum, bi);
        }
        q->s[blk] = finite ? top / 127.0f : NAN;
        q->sum[blk] = sum;
        q->asum[blk] = _mm512_reduce_add_epi32(asum);
        q->bsum[blk] = _mm512_reduce_add_epi32(bsum);
    }
    return 0;
}
#endif

/* ---------------------------------------------------------------------------------------------- int4 ---- */

/* A row's 32-bit word of an oct (the layout at the top), little-endian, and the code of its input 8o + e (e = 0..7):
 * the portable way to read them. */
static inline uint32_t oct_word(const uint8_t *b) {
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static inline int oct_code(uint32_t word, int e) { return (int)((word >> (8 * (e & 3) + 4 * (e >> 2))) & 15); }

/* Rows [m0, m0 + mb) of tile j of an item of tt tiles, the portable way: each code decoded, x exact in fp32. */
static inline void q4_tile_generic(const uint16_t *x, int64_t K, int64_t G, const uint8_t *item, const void *d,
                                   const void *mn, int f16, int tt, int j, int64_t m0, int64_t mb, float *acc) {
    const int64_t groups = K / G;
    for (int64_t r = 0; r < mb; r++) {
        const uint16_t *xr = x + (m0 + r) * K;
        float total[LANES] = {0};
        for (int64_t g = 0; g < groups; g++) {
            float part[LANES] = {0}, s = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) s += bf16_to_f32(xr[k]);
            for (int64_t o = g * G / 8; o < (g + 1) * G / 8; o++) {
                const uint8_t *bytes = item + (o * tt + j) * 64;
                for (int i = 0; i < LANES; i++) {
                    const uint32_t word = oct_word(bytes + 4 * i);
                    for (int e = 0; e < 8; e++) part[i] += (float)oct_code(word, e) * bf16_to_f32(xr[8 * o + e]);
                }
            }
            for (int i = 0; i < LANES; i++)
                total[i] += param(d, (g * tt + j) * LANES + i, f16) * part[i]
                            + param(mn, (g * tt + j) * LANES + i, f16) * s;
        }
        memcpy(acc + (j * MAX_MB + r) * LANES, total, sizeof(total));
    }
}

#if HAVE_VNNI_PATH
static inline __m512 load_params(const void *p, int64_t index, int f16) {
    if (f16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + index)));
    return _mm512_loadu_ps((const float *)p + index);
}

/* Four int8 activations as one 32-bit lane value, broadcast to all 16 lanes (an unaligned load). */
static inline __m512i broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* An item of TT interleaved tiles x MB activation rows (q: x split per group). */
static inline __attribute__((always_inline)) void q4_block_vnni(
    const int TT, const int MB, const QuantizedRows *q, int64_t K, int64_t G, const uint8_t *item, const void *d,
    const void *mn, int f16, int64_t m0, float *acc) {
    const __m512i mask = _mm512_set1_epi8(0x0F);
    const __m512 inv254 = _mm512_set1_ps(1.0f / 254.0f);
    const int64_t groups = K / G;
    __m512 acc_v[2][MAX_MB];
    for (int t = 0; t < TT; t++)
        for (int r = 0; r < MB; r++) acc_v[t][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i ia[2][MAX_MB], ib[2][MAX_MB]; /* Σ code·a, Σ code·b over the group: at most 15·127·G, exact */
        for (int t = 0; t < TT; t++)
            for (int r = 0; r < MB; r++) ia[t][r] = ib[t][r] = _mm512_setzero_si512();
        for (int64_t o = g * G / 8; o < (g + 1) * G / 8; o++) {
            const uint8_t *oct = item + o * TT * 64;
            if (PREFETCH) {
                _mm_prefetch((const char *)oct + PREFETCH, _MM_HINT_T1);
                if (TT == 2) _mm_prefetch((const char *)oct + PREFETCH + 64, _MM_HINT_T1);
            }
            __m512i lo[2], hi[2]; /* the codes of inputs 8o..8o+3 and 8o+4..8o+7, one byte each */
            for (int t = 0; t < TT; t++) {
                const __m512i w = _mm512_loadu_si512((const void *)(oct + t * 64));
                lo[t] = _mm512_and_si512(w, mask);
                hi[t] = _mm512_and_si512(_mm512_srli_epi32(w, 4), mask);
            }
            for (int r = 0; r < MB; r++) {
                const int8_t *a = q->a + (m0 + r) * K + 8 * o, *b = q->b + (m0 + r) * K + 8 * o;
                const __m512i a0 = broadcast4(a), a1 = broadcast4(a + 4), b0 = broadcast4(b), b1 = broadcast4(b + 4);
                for (int t = 0; t < TT; t++) {
                    ia[t][r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ia[t][r], lo[t], a0), hi[t], a1);
                    ib[t][r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ib[t][r], lo[t], b0), hi[t], b1);
                }
            }
        }
        for (int t = 0; t < TT; t++) {
            const __m512 dv = load_params(d, (g * TT + t) * LANES, f16);
            const __m512 mv = load_params(mn, (g * TT + t) * LANES, f16);
            for (int r = 0; r < MB; r++) {
                const int64_t blk = (m0 + r) * groups + g;
                const __m512 dot = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(ib[t][r]), inv254,
                                                                 _mm512_cvtepi32_ps(ia[t][r])),
                                                 _mm512_set1_ps(q->s[blk])); /* s · (Σ code·a + Σ code·b / 254) */
                acc_v[t][r] = _mm512_fmadd_ps(dv, dot, acc_v[t][r]);
                acc_v[t][r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(q->sum[blk]), acc_v[t][r]);
            }
        }
    }
    for (int t = 0; t < TT; t++)
        for (int r = 0; r < MB; r++) _mm512_storeu_ps(acc + (t * MAX_MB + r) * LANES, acc_v[t][r]);
}

#if HAVE_BF16_PATH
/* x [M, K] bf16 → xp [M, K] with each oct's inputs in the order the bf16 decode pairs them, (0, 2), (1, 3), (4, 6),
 * (5, 7), and sum [M, K/G] the exact Σ x per group, fp32. */
static void pair_rows(const uint16_t *x, int64_t M, int64_t K, int64_t G, uint16_t *xp, float *sum) {
    static const int order[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    short index[32];
    for (int i = 0; i < 32; i++) index[i] = (short)((i & ~7) + order[i & 7]);
    const __m512i perm = _mm512_loadu_si512((const void *)index);
    for (int64_t i = 0; i < M * K; i += 32) { /* M·K % 8 == 0: whole octs in every (masked) vector */
        const __mmask32 mask = M * K - i >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (M * K - i)) - 1);
        _mm512_mask_storeu_epi16(xp + i, mask, _mm512_permutexvar_epi16(perm, _mm512_maskz_loadu_epi16(mask, x + i)));
    }
    for (int64_t blk = 0; blk < M * (K / G); blk++) {
        float total = 0.0f;
        for (int64_t k = 0; k < G; k++) total += bf16_to_f32(x[blk * G + k]);
        sum[blk] = total;
    }
}

/* The same item with bf16 products, for blocks of several rows. Shift j of a row's word, masked and ORed with
 * 0x43004300, gives in each 16-bit half the bf16 number 128 + code (exponent 2^7, the code in the low mantissa bits),
 * so one shift and one ternary-logic op give a vector of 16 rows x 2 inputs (pairs as pair_rows orders them),
 * multiplied exactly by a broadcast input pair with vdpbf16ps. Per group: y += d · (Σ (128 + code)·x - 128 · Σ x) +
 * m · Σ x. The offset costs fp32 precision in the sum, ~17x the rounding of Σ code·x: still ~1e-6 relative. Why
 * two kernels: with one row, decoding a weight is most of the work, and the 8-bit path does it in 3 ops per 64 bytes
 * against 7; with more rows the products are, and there the bf16 path's 3 fp32 ops per group and row (against 6 to
 * turn two integer sums into one) were 12-25% faster over SmolLM2's layers from 16 to 511 rows. Up to 2 rows, even
 * and odd j accumulate apart (independent chains); from 3 rows on there are chains enough. */
static inline __attribute__((always_inline)) void q4_block_bf16(
    const int TT, const int MB, const uint16_t *xp, int64_t K, int64_t G, const uint8_t *item, const void *d,
    const void *mn, int f16, const float *xsum, int64_t m0, float *acc) {
    const __m512i mask = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
    const int64_t groups = K / G;
    __m512 acc_v[2][MAX_MB];
    for (int t = 0; t < TT; t++)
        for (int r = 0; r < MB; r++) acc_v[t][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 lo_v[2][MAX_MB], hi_v[2][MAX_MB]; /* the sums start at -128·Σx (exact) */
        for (int t = 0; t < TT; t++)
            for (int r = 0; r < MB; r++) {
                lo_v[t][r] = _mm512_set1_ps(-128.0f * xsum[(m0 + r) * groups + g]);
                hi_v[t][r] = _mm512_setzero_ps();
            }
        for (int64_t o = g * G / 8; o < (g + 1) * G / 8; o++) {
            const uint8_t *oct = item + o * TT * 64;
            if (PREFETCH) {
                _mm_prefetch((const char *)oct + PREFETCH, _MM_HINT_T1);
                if (TT == 2) _mm_prefetch((const char *)oct + PREFETCH + 64, _MM_HINT_T1);
            }
            __m512i w[2];
            for (int t = 0; t < TT; t++) w[t] = _mm512_loadu_si512((const void *)(oct + t * 64));
            for (int j = 0; j < 4; j++) { /* pair j: inputs (0, 2), (1, 3), (4, 6), (5, 7) at shifts 0, 8, 4, 12 */
                const int shift = 8 * (j & 1) + 4 * (j >> 1);
                __m512bh c[2];
                for (int t = 0; t < TT; t++) /* (w >> shift) & mask | magic: 0xEA is the table of (A & B) | C */
                    c[t] = (__m512bh)_mm512_ternarylogic_epi32(shift ? _mm512_srli_epi32(w[t], shift) : w[t], mask,
                                                               magic, 0xEA);
                for (int r = 0; r < MB; r++) {
                    const uint32_t pair = ((const uint32_t *)(xp + (m0 + r) * K + 8 * o))[j];
                    const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)pair);
                    for (int t = 0; t < TT; t++) {
                        if (MB <= 2 && (j & 1)) hi_v[t][r] = _mm512_dpbf16_ps(hi_v[t][r], c[t], xb);
                        else lo_v[t][r] = _mm512_dpbf16_ps(lo_v[t][r], c[t], xb);
                    }
                }
            }
        }
        for (int t = 0; t < TT; t++) {
            const __m512 dv = load_params(d, (g * TT + t) * LANES, f16);
            const __m512 mv = load_params(mn, (g * TT + t) * LANES, f16);
            for (int r = 0; r < MB; r++) {
                const __m512 dot = MB <= 2 ? _mm512_add_ps(lo_v[t][r], hi_v[t][r]) : lo_v[t][r];
                acc_v[t][r] = _mm512_fmadd_ps(dv, dot, acc_v[t][r]);
                acc_v[t][r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[(m0 + r) * groups + g]), acc_v[t][r]);
            }
        }
    }
    for (int t = 0; t < TT; t++)
        for (int r = 0; r < MB; r++) _mm512_storeu_ps(acc + (t * MAX_MB + r) * LANES, acc_v[t][r]);
}
#endif

#define Q4_CASES(TT)                                                                                             \
    switch (mb) {                                                                                               \
    case 1: q4_block_vnni(TT, 1, &q, K, G, item, dt, mt, f16, m0, acc); break;                                  \
    case 2: q4_block_vnni(TT, 2, &q, K, G, item, dt, mt, f16, m0, acc); break;                                  \
    case 3: q4_block_vnni(TT, 3, &q, K, G, item, dt, mt, f16, m0, acc); break;                                  \
    default: q4_block_vnni(TT, 4, &q, K, G, item, dt, mt, f16, m0, acc); break;                                 \
    }
#define Q4_BF16_CASES(TT)                                                                                        \
    switch (mb) {                                                                                               \
    case 1: q4_block_bf16(TT, 1, p->xp, K, G, item, dt, mt, f16, p->xsum, m0, acc); break;                      \
    case 2: q4_block_bf16(TT, 2, p->xp, K, G, item, dt, mt, f16, p->xsum, m0, acc); break;                      \
    case 3: q4_block_bf16(TT, 3, p->xp, K, G, item, dt, mt, f16, p->xsum, m0, acc); break;                      \
    default: q4_block_bf16(TT, 4, p->xp, K, G, item, dt, mt, f16, p->xsum, m0, acc); break;                     \
    }
#endif

/* The arguments of a product, shared by its work items. */
typedef struct {
    const uint16_t *x;
    int64_t M, K, N, G;
    const uint8_t *codes;
    const void *d, *mn; /* int4's parameters; int8's scales in d */
    int f16, out_is_bf16;
    void *out;
#if HAVE_VNNI_PATH
    QuantizedRows q;
#endif
    const uint16_t *xp; /* int4 with bf16 products: x paired (pair_rows) and its sums per group; else NULL */
    float *xsum;
} Product;

/* Work item `index` of an int4 product: tiles 2·index and the next one (if any), every row of x. */
static void q4_item(const void *args, int64_t index) {
    const Product *p = (const Product *)args;
    const int64_t K = p->K, G = p->G, M = p->M, num_tiles = p->N / LANES, t0 = 2 * index;
    const int64_t param_offset = t0 * (K / G) * LANES * (p->f16 ? 2 : 4);
    const int tt = t0 + 1 < num_tiles ? 2 : 1, f16 = p->f16;
    const uint8_t *item = p->codes + t0 * (K / 8 * 64);
    const void *dt = (const char *)p->d + param_offset, *mt = (const char *)p->mn + param_offset;
    float acc[2 * MAX_MB * LANES];
    for (int64_t m0 = 0; m0 < M; m0 += MAX_MB) {
        const int64_t mb = M - m0 < MAX_MB ? M - m0 : MAX_MB;
#if HAVE_BF16_PATH
        if (p->xp) {
            if (tt == 2) { Q4_BF16_CASES(2) } else { Q4_BF16_CASES(1) }
        } else
#endif
        {
#if HAVE_VNNI_PATH
            const QuantizedRows q = p->q;
            if (tt == 2) { Q4_CASES(2) } else { Q4_CASES(1) }
#else
            for (int j = 0; j < tt; j++) q4_tile_generic(p->x, K, G, item, dt, mt, f16, tt, j, m0, mb, acc);
#endif
        }
        store_item(p->out, p->out_is_bf16, p->N, t0, tt, m0, mb, acc);
    }
}

/* x [M, K] bf16; codes [N/16, K/8, 64] uint8 and d, mn [N/16, K/G, 16] fp16 (f16) or fp32, pairs interleaved (see
 * the top); out [M, N] fp32 or bf16. Returns 0, -1 for shapes the layout cannot hold (N % 16, K % G, G % 8), or -2
 * when out of memory. */
int longfit_q4_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const void *d, const void *mn,
                      int f16, int64_t N, int64_t G, int num_threads, void *out, int out_is_bf16) {
    if (M < 0 || N % LANES || G <= 0 || G % 8 || K % G) return -1;
    if (M == 0) return 0; /* no rows: nothing to write */
    Product p = {.x = x, .M = M, .K = K, .N = N, .G = G, .codes = codes, .d = d, .mn = mn, .f16 = f16,
                 .out_is_bf16 = out_is_bf16, .out = out};
    void *scratch = NULL;
#if HAVE_BF16_PATH
    if (M >= Q4_BF16_MIN_ROWS) {
        uint16_t *xp = (uint16_t *)malloc((size_t)(M * K) * 2 + (size_t)(M * (K / G)) * 4);
        if (!xp) return -2;
        p.xsum = (float *)(xp + M * K);
        pair_rows(x, M, K, G, xp, p.xsum);
        p.xp = scratch = xp;
    }
#endif
#if HAVE_VNNI_PATH
    if (!p.xp) {
        if (quantize_rows(x, M, K, G, &p.q)) return -2;
        scratch = p.q.s;
    }
#endif
    for_items(q4_item, &p, (N / LANES + 1) / 2, num_threads);
    free(scratch);
    return 0;
}

/* The weight the int4 kernel multiplies by, w[n, k] = code · d + m, into out [N, K] (row-major) in fp32 or bf16:
 * for the many-row products (prompt chunks), which multiply a dequantized weight with one GEMM. Rounded as
 * longfit/quant/linear.py's torch expression (code · d rounded to fp32, then + m rounded, then bf16 once): the
 * product is formed in double, where it is exact, so no fused multiply-add can merge the two roundings. Returns 0, or
 * -1 for shapes the layout cannot hold. */
int longfit_q4_dequantize(const uint8_t *codes, const void *d, const void *mn, int f16, int64_t N, int64_t K,
                          int64_t G, int num_threads, void *out, int out_is_bf16) {
    if (N % LANES || G <= 0 || G % 8 || K % G || G > MAX_GROUP) return -1;
    const int64_t groups = K / G, num_tiles = N / LANES, tile_bytes = K / 8 * 64, param_stride = groups * LANES;
    const size_t param_bytes = f16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < num_tiles; t++) {
        const int64_t t0 = t - (t & 1);  /* the item (pair of tiles) holding tile t, as j-th of its tt tiles */
        const int j = (int)(t - t0), tt = t0 + 1 < num_tiles ? 2 : 1;
        const uint8_t *item = codes + t0 * tile_bytes;
        const void *dt = (const char *)d + t0 * param_stride * param_bytes;
        const void *mt = (const char *)mn + t0 * param_stride * param_bytes;
        /* Row by row, so that out is written front to back (the tile's few KiB of codes stay in L1). */
        for (int i = 0; i < LANES; i++)
            for (int64_t g = 0; g < groups; g++) {
                const double dv = param(dt, (g * tt + j) * LANES + i, f16);
                const float mv = param(mt, (g * tt + j) * LANES + i, f16);
                float w[MAX_GROUP];
                for (int64_t o = 0; o < G / 8; o++) {
                    const uint32_t word = oct_word(item + ((g * G / 8 + o) * tt + j) * 64 + 4 * i);
                    for (int e = 0; e < 8; e++) w[8 * o + e] = (float)(oct_code(word, e) * dv) + mv;
                }
                store_row(out, out_is_bf16, (t * LANES + i) * K + g * G, w, G);
            }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------- int8 ---- */

/* Tile j of an item of tt tiles, the portable way: codes + 128 in quads (the top), x exact in fp32; scales: the
 * tile's 16, bf16. */
static inline void q8_tile_generic(const uint16_t *x, int64_t K, const uint8_t *item, int tt, int j,
                                   const uint16_t *scales, int64_t m0, int64_t mb, float *acc) {
    for (int64_t r = 0; r < mb; r++) {
        float total[LANES] = {0};
        const uint16_t *xr = x + (m0 + r) * K;
        for (int64_t k = 0; k < K; k++) {
            const uint8_t *quad = item + ((k / 4) * tt + j) * 64 + k % 4;
            for (int i = 0; i < LANES; i++) total[i] += (float)((int)quad[4 * i] - 128) * bf16_to_f32(xr[k]);
        }
        for (int i = 0; i < LANES; i++) acc[(j * MAX_MB + r) * LANES + i] = total[i] * bf16_to_f32(scales[i]);
    }
}

#if HAVE_VNNI_PATH
/* An item of TT interleaved tiles x MB activation rows (q: each row of x split whole). */
static inline __attribute__((always_inline)) void q8_block_vnni(const int TT, const int MB, const QuantizedRows *q,
                                                                int64_t K, const uint8_t *item,
                                                                const uint16_t *scales, int64_t m0, float *acc) {
    /* Σ (code + 128)·a, the same with b: at most 255·127·K in magnitude (K < 66000 fits in 32 bits) */
    const __m512 inv254 = _mm512_set1_ps(1.0f / 254.0f);
    __m512i ia[2][MAX_MB], ib[2][MAX_MB];
    for (int t = 0; t < TT; t++)
        for (int r = 0; r < MB; r++) ia[t][r] = ib[t][r] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 4) {
        const uint8_t *w = item + k * TT * LANES; /* quad k / 4 of the item's tiles: TT * 64 bytes */
        if (PREFETCH) {
            _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T1);
            if (TT == 2) _mm_prefetch((const char *)w + PREFETCH + 64, _MM_HINT_T1);
        }
        __m512i wv[2];
        for (int t = 0; t < TT; t++) wv[t] = _mm512_loadu_si512((const void *)(w + t * 64));
        for (int r = 0; r < MB; r++) {
            const __m512i a = broadcast4(q->a + (m0 + r) * K + k), b = broadcast4(q->b + (m0 + r) * K + k);
            for (int t = 0; t < TT; t++) {
                ia[t][r] = _mm512_dpbusd_epi32(ia[t][r], wv[t], a);
                ib[t][r] = _mm512_dpbusd_epi32(ib[t][r], wv[t], b);
            }
        }
    }
    for (int t = 0; t < TT; t++) {
        const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(scales + t * LANES))), 16));
        for (int r = 0; r < MB; r++) {
            const int64_t row = m0 + r;
            /* minus 128 · Σ a: Σ code · a, at most 127·127·K: exact in fp32 up to K = 1040, then rounded (2^-24) */
            const __m512i da = _mm512_sub_epi32(ia[t][r], _mm512_set1_epi32(128 * q->asum[row]));
            const __m512i db = _mm512_sub_epi32(ib[t][r], _mm512_set1_epi32(128 * q->bsum[row]));
            const __m512 dot = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(db), inv254, _mm512_cvtepi32_ps(da)),
                                             _mm512_set1_ps(q->s[row]));
            _mm512_storeu_ps(acc + (t * MAX_MB + r) * LANES, _mm512_mul_ps(dot, sc));
        }
    }
}

#define Q8_CASES(TT)                                                                                             \
    switch (mb) {                                                                                               \
    case 1: q8_block_vnni(TT, 1, &q, K, item, sc, m0, acc); break;                                              \
    case 2: q8_block_vnni(TT, 2, &q, K, item, sc, m0, acc); break;                                              \
    case 3: q8_block_vnni(TT, 3, &q, K, item, sc, m0, acc); break;                                              \
    default: q8_block_vnni(TT, 4, &q, K, item, sc, m0, acc); break;                                             \
    }
#endif

/* Work item `index` of an int8 product: tiles 2·index and the next one (if any), every row of x. */
static void q8_item(const void *args, int64_t index) {
    const Product *p = (const Product *)args;
    const int64_t K = p->K, M = p->M, num_tiles = p->N / LANES, t0 = 2 * index;
    const int tt = t0 + 1 < num_tiles ? 2 : 1;
    const uint8_t *item = p->codes + t0 * K * LANES;
    const uint16_t *sc = (const uint16_t *)p->d + t0 * LANES;
    float acc[2 * MAX_MB * LANES];
    for (int64_t m0 = 0; m0 < M; m0 += MAX_MB) {
        const int64_t mb = M - m0 < MAX_MB ? M - m0 : MAX_MB;
#if HAVE_VNNI_PATH
        const QuantizedRows q = p->q;
        if (tt == 2) { Q8_CASES(2) } else { Q8_CASES(1) }
#else
        for (int j = 0; j < tt; j++) q8_tile_generic(p->x, K, item, tt, j, sc + j * LANES, m0, mb, acc);
#endif
        store_item(p->out, p->out_is_bf16, p->N, t0, tt, m0, mb, acc);
    }
}

/* x [M, K] bf16; codes [N/16, K/4, 64] uint8 (code + 128), pairs interleaved (see the top); scales [N] bf16; out
 * [M, N] fp32 or bf16. Returns 0, -1 for N % 16 or K % 4, or -2 when out of memory. */
int longfit_q8_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *scales,
                      int64_t N, int num_threads, void *out, int out_is_bf16) {
    if (M < 0 || N % LANES || K % 4 || K <= 0 || K > 65536) return -1;
    if (M == 0) return 0; /* no rows: nothing to write */
    Product p = {.x = x, .M = M, .K = K, .N = N, .codes = codes, .d = scales, .out_is_bf16 = out_is_bf16,
                 .out = out};
#if HAVE_VNNI_PATH
    if (quantize_rows(x, M, K, K, &p.q)) return -2;
#endif
    for_items(q8_item, &p, (N / LANES + 1) / 2, num_threads);
#if HAVE_VNNI_PATH
    free(p.q.s);
#endif
    return 0;
}
