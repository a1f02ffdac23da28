/* Products of a few bf16 activation rows with a dense bf16 weight as it is: y = x @ W^T, W [N, K] row-major.
 *
 * Why: oneDNN's prepacked product (longfit/quant/matmul.py) pays a fixed cost per call that dominates at one row
 * (scripts/matmul_blocks.py, each call from DRAM: 0.37 ms for a 256x640 weight, 0.50 ms for 2048x640), and a
 * Gemma-3-270M decode step is 72 such products (docs/PERFORMANCE.md). Reading the plain row-major weight also keeps
 * one copy of it for both paths: prompt chunks multiply the same tensor with torch.
 *
 * Exact bf16 products (vdpbf16ps), fp32 sums. Work items are blocks of ROWS output rows, read row after row, 64 bytes
 * of each at a time; each output row and activation row keeps one fp32 accumulator vector, reduced once at the end.
 * K % 32 == 0. CPUs without AVX512-BF16 (and a last block of fewer than ROWS rows) run plain C loops. Built and
 * loaded by longfit/runtime/native.py with the other kernels.
 */
#include <stdint.h>

#include "bf16.h"
#include "parallel.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_PATH 1
#else
#define HAVE_BF16_PATH 0
#endif

#define ROWS 4   /* output rows per work item */
#define MAX_MB 4 /* activation rows per register block */
#ifndef PREFETCH
#define PREFETCH 8192 /* bytes ahead of each weight row prefetched into L2 */
#endif

typedef struct {
    const uint16_t *x, *w;
    int64_t M, K, N;
    void *out;
    int out_is_bf16;
} Dense;

static void block_generic(const Dense *p, int64_t n0, int64_t rows, int64_t m0, int64_t mb, float *acc) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t r = 0; r < mb; r++) {
            float total = 0.0f;
            for (int64_t k = 0; k < p->K; k++)
                total += bf16_to_f32(p->w[(n0 + i) * p->K + k]) * bf16_to_f32(p->x[(m0 + r) * p->K + k]);
            acc[r * ROWS + i] = total;
        }
}

#if HAVE_BF16_PATH
static inline __attribute__((always_inline)) void block_bf16(const int MB, const Dense *p, int64_t n0, int64_t m0,
                                                             float *acc) {
    const int64_t K = p->K;
    const uint16_t *w = p->w + n0 * K;
    __m512 sum[ROWS][MAX_MB];
    for (int i = 0; i < ROWS; i++)
        for (int r = 0; r < MB; r++) sum[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh xv[MAX_MB];
        for (int r = 0; r < MB; r++) xv[r] = (__m512bh)_mm512_loadu_si512((const void *)(p->x + (m0 + r) * K + k));
        for (int i = 0; i < ROWS; i++) {
            if (PREFETCH) _mm_prefetch((const char *)(w + i * K + k) + PREFETCH, _MM_HINT_T1);
            const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + i * K + k));
            for (int r = 0; r < MB; r++) sum[i][r] = _mm512_dpbf16_ps(sum[i][r], wv, xv[r]);
        }
    }
    for (int i = 0; i < ROWS; i++)
        for (int r = 0; r < MB; r++) acc[r * ROWS + i] = _mm512_reduce_add_ps(sum[i][r]);
}
#endif

/* Work item `index`: output rows [ROWS·index, ROWS·index + ROWS) ∩ [0, N), every row of x. */
static void dense_item(const void *args, int64_t index) {
    const Dense *p = (const Dense *)args;
    const int64_t n0 = index * ROWS, rows = p->N - n0 < ROWS ? p->N - n0 : ROWS;
    float acc[MAX_MB * ROWS];
    for (int64_t m0 = 0; m0 < p->M; m0 += MAX_MB) {
        const int64_t mb = p->M - m0 < MAX_MB ? p->M - m0 : MAX_MB;
#if HAVE_BF16_PATH
        if (rows == ROWS) {
            switch (mb) {
            case 1: block_bf16(1, p, n0, m0, acc); break;
            case 2: block_bf16(2, p, n0, m0, acc); break;
            case 3: block_bf16(3, p, n0, m0, acc); break;
            default: block_bf16(4, p, n0, m0, acc); break;
            }
        } else
#endif
            block_generic(p, n0, rows, m0, mb, acc);
        for (int64_t r = 0; r < mb; r++)
            for (int64_t i = 0; i < rows; i++) {
                const float v = acc[r * ROWS + i];
                if (p->out_is_bf16) ((uint16_t *)p->out)[(m0 + r) * p->N + n0 + i] = f32_to_bf16(v);
                else ((float *)p->out)[(m0 + r) * p->N + n0 + i] = v;
            }
    }
}

/* x [M, K] bf16; w [N, K] bf16 row-major; out [M, N] fp32 or bf16. Returns 0, or -1 for K % 32 or empty shapes. */
int longfit_bf16_linear(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, int num_threads,
                        void *out, int out_is_bf16) {
    if (M < 0 || N <= 0 || K <= 0 || K % 32) return -1;
    if (M == 0) return 0; /* no rows: nothing to write */
    const Dense p = {.x = x, .w = w, .M = M, .K = K, .N = N, .out = out, .out_is_bf16 = out_is_bf16};
    for_items(dense_item, &p, (N + ROWS - 1) / ROWS, num_threads);
    return 0;
}
