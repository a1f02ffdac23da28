/* Products of bf16 activations with int4 / int8 weights, for the few-row case (decode steps): y = x @ W^T.
 *
 * torch's CPU kernels (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm) convert each weight to float and reuse
 * nothing across rows; on one core they read SmolLM2's int4 layers at ~8 GB/s. Here the weights are stored in
 * tiles of 16 output rows so that one vector register holds 16 rows' values at one or two inputs: a weight vector
 * is decoded once and multiplied by every activation row of the call, a broadcast pair of inputs at a time.
 *
 * Work items are pairs of adjacent tiles (the last tile alone when their count is odd): two tiles give the decode
 * loop independent chains, and each pair is stored interleaved (below), so that an item, and the whole weight, is
 * one forward stream of memory, prefetched PREFETCH bytes ahead.
 *
 * int4 (llama.cpp's Q4_1 form, exact for GGUF Q4_1): w[n, k] = code · d[n, g] + m[n, g], g = k / G, codes 0..15,
 * d and m fp16. A tile's oct o (inputs 8o..8o+7) is 64 bytes: 32-bit word i is row i's, and its bits 4j..4j+3 hold
 * the code for input 8o + 2j, bits 16 + 4j.. the code for input 8o + 2j + 1 (j = 0..3). Codes [N/16, K/8, 64] uint8
 * as memory, where a pair of tiles stores oct 0 of both tiles, then oct 1 of both, ... (tt = 2 tiles per item; 1 for
 * a last odd tile), and the parameters [N/16, K/G, 16] are interleaved the same way per group. Decoding, with no
 * shuffle: (word >> 4j) & 0x000F000F | 0x43004300 is, in each 16-bit half, the bf16 number 128 + code (exponent 2^7,
 * the code in the low mantissa bits), so one shift and one ternary-logic op give a vector of 16 rows x 2 inputs,
 * multiplied by the broadcast input pair with vdpbf16ps, exactly (bf16 x bf16 products are exact in fp32). Per
 * group: y += d · (Σ (128 + code)·x - 128 · Σ x) + m · Σ x. The former layout widened bytes and looked codes up
 * with two vpermw per 64 weights: 3-11% slower over SmolLM2's 120 int4 layers from DRAM on one core (the shuffle
 * unit, not memory, was busiest). The offset costs fp32 precision in the sum, ~17x the rounding of Σ code·x: still
 * ~1e-6 relative, far below the bf16 output's 2^-9. Parameters [N/16, K/G, 16] each, fp16 (GGUF's own) or fp32
 * (where fp16 would round them: RTN parameters in bf16 whose m needs more bits).
 *
 * int8 (per output channel): w[n, k] = code · s[n], codes -127..127. The 16 rows' codes at input k are 16
 * consecutive bytes (pairs of tiles interleaved per input, as above: [N/16, K, 16] as memory), widened to fp32 and
 * multiplied by x[k] in fp32. s [N] bf16.
 *
 * Sums are fp32; the result matches dequantize-then-matmul in fp32 to rounding. out [M, N] is fp32 or bf16
 * (round to nearest even). CPUs without AVX512-BF16 run plain C loops over the same layouts (vectorized by the
 * compiler). Built and loaded by longfit/runtime/native.py, with paged_decode.c.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_BF16_PATH 1
#else
#define HAVE_BF16_PATH 0
#endif

#define LANES 16
#define MAX_MB 4 /* activation rows per register block */
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

/* ---------------------------------------------------------------------------------------------- int4 ---- */

static inline float param(const void *p, int64_t index, int f16) {
    return f16 ? f16_to_f32(((const uint16_t *)p)[index]) : ((const float *)p)[index];
}

/* A row's 32-bit word of an oct (the layout at the top), little-endian, and the code of its input 8o + e (e = 0..7):
 * the portable way to read them. */
static inline uint32_t oct_word(const uint8_t *b) {
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static inline int oct_code(uint32_t word, int e) { return (int)((word >> (16 * (e & 1) + 4 * (e >> 1))) & 15); }

/* Rows [m0, m0 + mb) of tile j of an item of tt tiles, the portable way: decode each code, accumulate per lane. */
static inline void q4_tile_generic(const uint16_t *x, int64_t K, int64_t G, const uint8_t *item, const void *d,
                                   const void *mn, int f16, int tt, int j, const float *xsum, int64_t m0, int64_t mb,
                                   float *acc) {
    const int64_t groups = K / G;
    for (int64_t r = 0; r < mb; r++) {
        const uint16_t *xr = x + (m0 + r) * K;
        float total[LANES] = {0};
        for (int64_t g = 0; g < groups; g++) {
            float part[LANES] = {0};
            for (int64_t o = g * G / 8; o < (g + 1) * G / 8; o++) {
                const uint8_t *bytes = item + (o * tt + j) * 64;
                for (int i = 0; i < LANES; i++) {
                    const uint32_t word = oct_word(bytes + 4 * i);
                    for (int e = 0; e < 8; e++) part[i] += (float)oct_code(word, e) * bf16_to_f32(xr[8 * o + e]);
                }
            }
            float s = xsum[(m0 + r) * groups + g];
            for (int i = 0; i < LANES; i++)
                total[i] += param(d, (g * tt + j) * LANES + i, f16) * part[i]
                            + param(mn, (g * tt + j) * LANES + i, f16) * s;
        }
        memcpy(acc + (j * MAX_MB + r) * LANES, total, sizeof(total));
    }
}

#if HAVE_BF16_PATH
static inline __m512 load_params(const void *p, int64_t index, int f16) {
    if (f16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + index)));
    return _mm512_loadu_ps((const float *)p + index);
}

/* An item of TT interleaved tiles x MB activation rows. Up to 2 rows, even and odd j accumulate apart (independent
 * chains for the dot products' latency); from 3 rows on there are chains enough, and the registers are needed. */
static inline __attribute__((always_inline)) void q4_block_bf16(
    const int TT, const int MB, const uint16_t *x, int64_t K, int64_t G, const uint8_t *item, const void *d,
    const void *mn, int f16, const float *xsum, int64_t m0, float *acc) {
    const __m512i mask = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
    const int64_t groups = K / G;
    __m512 acc_v[2][MAX_MB];
    for (int t = 0; t < TT; t++)
        for (int r = 0; r < MB; r++) acc_v[t][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        /* Σ (128 + code)·x - 128·Σx = Σ code·x: the sums start at -128·Σx (exact) */
        __m512 lo_v[2][MAX_MB], hi_v[2][MAX_MB];
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
            /* j-major: two decoded vectors and one broadcast input pair live at a time (with all four decoded and
             * every row's four pairs hoisted, the 4-row blocks ran out of registers) */
            for (int j = 0; j < 4; j++) {
                __m512bh c[2];
                for (int t = 0; t < TT; t++)  /* (w >> 4j) & mask | magic: 0xEA is the table of (A & B) | C */
                    c[t] = (__m512bh)_mm512_ternarylogic_epi32(j ? _mm512_srli_epi32(w[t], 4 * j) : w[t], mask,
                                                               magic, 0xEA);
                for (int r = 0; r < MB; r++) {
                    const uint32_t pair = ((const uint32_t *)(x + (m0 + r) * K + 8 * o))[j];  /* inputs 2j, 2j+1 */
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

#define Q4_CASES(TT)                                                                                             \
    switch (mb) {                                                                                               \
    case 1: q4_block_bf16(TT, 1, x, K, G, item, dt, mt, f16, xsum, m0, acc); break;                             \
    case 2: q4_block_bf16(TT, 2, x, K, G, item, dt, mt, f16, xsum, m0, acc); break;                             \
    case 3: q4_block_bf16(TT, 3, x, K, G, item, dt, mt, f16, xsum, m0, acc); break;                             \
    default: q4_block_bf16(TT, 4, x, K, G, item, dt, mt, f16, xsum, m0, acc); break;                            \
    }
#endif

/* x [M, K] bf16; codes [N/16, K/8, 64] uint8 and d, mn [N/16, K/G, 16] fp16 (f16) or fp32, pairs interleaved (see
 * the top); out [M, N] fp32 or bf16. Returns 0, or -1 for shapes the layout cannot hold (N % 16, K % G, G % 8). */
int longfit_q4_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const void *d, const void *mn,
                      int f16, int64_t N, int64_t G, int num_threads, void *out, int out_is_bf16) {
    if (M <= 0 || N % LANES || G <= 0 || G % 8 || K % G) return -1;
    const int64_t groups = K / G, num_tiles = N / LANES, tile_bytes = K / 8 * 64, param_stride = groups * LANES;
    const size_t param_bytes = f16 ? 2 : 4;
    float *xsum = (float *)malloc((size_t)(M * groups) * sizeof(float));
    if (!xsum) return -2;
    for (int64_t r = 0; r < M; r++)
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) s += bf16_to_f32(x[r * K + k]);
            xsum[r * groups + g] = s;
        }
    const int64_t items = (num_tiles + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t index = 0; index < items; index++) {
        const int64_t t0 = 2 * index;
        const int tt = t0 + 1 < num_tiles ? 2 : 1;
        const uint8_t *item = codes + t0 * tile_bytes;
        const void *dt = (const char *)d + t0 * param_stride * param_bytes;
        const void *mt = (const char *)mn + t0 * param_stride * param_bytes;
        float acc[2 * MAX_MB * LANES];
        for (int64_t m0 = 0; m0 < M; m0 += MAX_MB) {
            const int64_t mb = M - m0 < MAX_MB ? M - m0 : MAX_MB;
#if HAVE_BF16_PATH
            if (tt == 2) { Q4_CASES(2) } else { Q4_CASES(1) }
#else
            for (int j = 0; j < tt; j++) q4_tile_generic(x, K, G, item, dt, mt, f16, tt, j, xsum, m0, mb, acc);
#endif
            store_item(out, out_is_bf16, N, t0, tt, m0, mb, acc);
        }
    }
    free(xsum);
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

/* Tile j of an item of tt tiles: xf [M, K] fp32; item's codes interleaved per input; scales: the tile's 16, bf16. */
static inline void q8_tile_generic(const float *xf, int64_t K, const int8_t *item, int tt, int j,
                                   const uint16_t *scales, int64_t m0, int64_t mb, float *acc) {
    for (int64_t r = 0; r < mb; r++) {
        float total[LANES] = {0};
        const float *xr = xf + (m0 + r) * K;
        for (int64_t k = 0; k < K; k++)
            for (int i = 0; i < LANES; i++) total[i] += (float)item[(k * tt + j) * LANES + i] * xr[k];
        for (int i = 0; i < LANES; i++) acc[(j * MAX_MB + r) * LANES + i] = total[i] * bf16_to_f32(scales[i]);
    }
}

#if HAVE_BF16_PATH
static inline __attribute__((always_inline)) void q8_block(const int TT, const int MB, const float *xf, int64_t K,
                                                           const int8_t *item, const uint16_t *scales, int64_t m0,
                                                           float *acc) {
    __m512 even[2][MAX_MB], odd[2][MAX_MB];
    for (int t = 0; t < TT; t++)
        for (int r = 0; r < MB; r++) even[t][r] = odd[t][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 2) { /* K is even: checked by the caller */
        const int8_t *w = item + k * TT * LANES; /* inputs k and k + 1 of the item's tiles: 2 * TT * 16 bytes */
        if (PREFETCH) _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T1);
        for (int t = 0; t < TT; t++) {
            __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + t * LANES))));
            __m512 w1 = _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + (TT + t) * LANES))));
            for (int r = 0; r < MB; r++) {
                even[t][r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xf[(m0 + r) * K + k]), even[t][r]);
                odd[t][r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xf[(m0 + r) * K + k + 1]), odd[t][r]);
            }
        }
    }
    for (int t = 0; t < TT; t++) {
        __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(scales + t * LANES))), 16));
        for (int r = 0; r < MB; r++)
            _mm512_storeu_ps(acc + (t * MAX_MB + r) * LANES, _mm512_mul_ps(_mm512_add_ps(even[t][r], odd[t][r]), s));
    }
}

#define Q8_CASES(TT)                                                                                             \
    switch (mb) {                                                                                               \
    case 1: q8_block(TT, 1, xf, K, item, sc, m0, acc); break;                                                   \
    case 2: q8_block(TT, 2, xf, K, item, sc, m0, acc); break;                                                   \
    case 3: q8_block(TT, 3, xf, K, item, sc, m0, acc); break;                                                   \
    default: q8_block(TT, 4, xf, K, item, sc, m0, acc); break;                                                  \
    }
#endif

/* x [M, K] bf16; codes [N/16, K, 16] int8, pairs interleaved (see the top); scales [N] bf16; out [M, N] fp32 or
 * bf16. Returns 0, or -1 for N % 16 or odd K. */
int longfit_q8_linear(const uint16_t *x, int64_t M, int64_t K, const int8_t *codes, const uint16_t *scales,
                      int64_t N, int num_threads, void *out, int out_is_bf16) {
    if (M <= 0 || N % LANES || K % 2 || K <= 0) return -1;
    const int64_t num_tiles = N / LANES, tile_bytes = K * LANES;
    float *xf = (float *)malloc((size_t)(M * K) * sizeof(float));
    if (!xf) return -2;
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_f32(x[i]);
    const int64_t items = (num_tiles + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t index = 0; index < items; index++) {
        const int64_t t0 = 2 * index;
        const int tt = t0 + 1 < num_tiles ? 2 : 1;
        const int8_t *item = codes + t0 * tile_bytes;
        const uint16_t *sc = scales + t0 * LANES;
        float acc[2 * MAX_MB * LANES];
        for (int64_t m0 = 0; m0 < M; m0 += MAX_MB) {
            const int64_t mb = M - m0 < MAX_MB ? M - m0 : MAX_MB;
#if HAVE_BF16_PATH
            if (tt == 2) { Q8_CASES(2) } else { Q8_CASES(1) }
#else
            for (int j = 0; j < tt; j++) q8_tile_generic(xf, K, item, tt, j, sc + j * LANES, m0, mb, acc);
#endif
            store_item(out, out_is_bf16, N, t0, tt, m0, mb, acc);
        }
    }
    free(xf);
    return 0;
}
