/* Decode attention over paged KV in one pass: each key and value byte is read once, in its stored dtype.
 *
 * The torch path (longfit/models/paged_decode.py) gathers the pages, converts them to a heads-first fp32 copy and
 * runs two batched matmuls: it moves each KV byte ~4 times. Here a work item is (row, key split): it walks the
 * row's pages in order, a tile of up to 32 tokens at a time, and for every KV head takes its g query heads' scores
 * and folds the tile into a running softmax (flash-decoding: running max m, sum l, accumulator acc[D] per query
 * head), then the tile's values. A page's keys (and then its values) are one contiguous run of memory read front
 * to back, and the page AHEAD pages on is prefetched while this one is used: the pages are scattered over the pool,
 * and without the prefetch a row at depth waits on DRAM at every page. The prefetch goes to L2 in Hq + 1 pieces, one
 * before each query head's scores and one before the values: issued as one burst into L1 at the page's start, it
 * stalled the core until the burst was in flight and read ~7.5 GB/s at 4k tokens on one core; spread, ~14 GB/s
 * (SmolLM2's 30 layers at 4k: 12.7 -> 6.8 ms, one thread, scattered pages). Splits of one row are merged at the end.
 * Scores, softmax and accumulation are fp32, as in the torch path; the result matches it to fp32 rounding.
 *
 * Layouts (C-contiguous): q [B, Hkv * g, D] bf16 (q_is_bf16) or fp32; pool [num_blocks, 2, bs, Hkv, D] bf16 or
 * fp32; pages [B, P] int64; first_key, seq_lens [B] int64; out [B, Hkv * g, D] fp32; scratch
 * [B * splits, Hkv * g, D + 2] fp32. Key first_key[b] + j of row b is read where it is < seq_lens[b] and, with
 * window > 0, > seq_lens[b] - 1 - window.
 *
 * Built at run time by longfit/runtime/native.py (cc -O3 -march=native -fopenmp); OpenMP resolves to the libgomp
 * torch already loaded, so the kernel shares torch's thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "fast_exp.h"

#define TILE 32    /* tokens per tile: 8 KiB of fp32 values per head at D 64, in L1 */
#define MAX_D 512
#define MAX_HQ 64  /* query heads */
#ifndef AHEAD
#define AHEAD 2    /* pages prefetched ahead of the one read */
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_PATH 1
#else
#define HAVE_BF16_PATH 0
#endif

static inline void to_float(float *dst, const void *src, int64_t n, int is_bf16) {
    if (is_bf16) {
        const uint16_t *h = (const uint16_t *)src;
        uint32_t *d = (uint32_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = (uint32_t)h[i] << 16;
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

static inline void prefetch(const char *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
}

#if HAVE_BF16_PATH
/* r[t] = the sum of v[t]'s 16 lanes, for 16 vectors at once (a transpose-and-add tree: ~3 ops a vector instead of
 * a full horizontal reduction each). */
static inline __m512 sum_lanes16(const __m512 *v) {
    __m512 t[8], w[4];
    for (int j = 0; j < 8; j++)  /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        t[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
    for (int k = 0; k < 4; k++)  /* per 128-bit lane: the lane's sums of v[4k .. 4k+3] */
        w[k] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

#if HAVE_BF16_PATH
/* acc[gi][d0 .. d0+64) += sum_t p[gi][t] * v_t[d0 .. d0+64) for gn (1-4, a constant once inlined) query heads of one
 * KV head: the 64 values of a token are converted once, and the gn x 4 accumulators stay in registers over the
 * tile. vals: the tile's first token's values at d0 (bf16, token_stride apart); p: TILE apart per query head. */
static inline __attribute__((always_inline)) void values64(const int gn, const uint16_t *vals, int64_t n,
                                                           int64_t token_stride, const float *p, float *acc,
                                                           int64_t dim) {
    __m512 a[4][4];
    for (int gi = 0; gi < gn; gi++)
        for (int c = 0; c < 4; c++) a[gi][c] = _mm512_loadu_ps(acc + gi * dim + 16 * c);
    for (int64_t t = 0; t < n; t++) {
        const uint16_t *vt = vals + t * token_stride;
        __m512 v[4];
        for (int c = 0; c < 4; c++)
            v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vt + 16 * c))), 16));
        for (int gi = 0; gi < gn; gi++) {
            const __m512 pt = _mm512_set1_ps(p[gi * TILE + t]);
            for (int c = 0; c < 4; c++) a[gi][c] = _mm512_fmadd_ps(pt, v[c], a[gi][c]);
        }
    }
    for (int gi = 0; gi < gn; gi++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc + gi * dim + 16 * c, a[gi][c]);
}
#endif

#if HAVE_BF16_PATH
/* s[0..16) = scale * q · k_t for 16 tokens, DIM a constant once inlined (64, 128, 256): the loop over the dimension
 * unrolls into 16 independent chains; with a run-time dim it stayed a two-iteration loop per token, ~25% slower. */
static inline __attribute__((always_inline)) void scores16(const int DIM, const uint16_t *qh, const uint16_t *k,
                                                           int64_t token_stride, float scale, float *s) {
    __m512 z[16];
    for (int u = 0; u < 16; u++) {
        const uint16_t *kt = k + u * token_stride;
        z[u] = _mm512_setzero_ps();
        for (int d = 0; d < DIM; d += 32)
            z[u] = _mm512_dpbf16_ps(z[u], (__m512bh)_mm512_loadu_si512(qh + d), (__m512bh)_mm512_loadu_si512(kt + d));
    }
    _mm512_storeu_ps(s, _mm512_mul_ps(sum_lanes16(z), _mm512_set1_ps(scale)));
}
#endif

/* Scores of n tokens for one query: s[t] = scale * q · k_t. q is fp32 (qf) or, on the bf16 path, bf16 (qh);
 * keys are token_stride elements apart. */
static inline void scores(const float *qf, const uint16_t *qh, const char *keys, int64_t n, int64_t token_stride,
                          int64_t dim, float scale, int is_bf16, int bf16_path, float *s) {
#if HAVE_BF16_PATH
    if (bf16_path) {  /* products of two bf16 are exact in fp32; the sums are fp32 */
        const uint16_t *k = (const uint16_t *)keys;
        int64_t t = 0;
        for (; t + 16 <= n; t += 16) {
            const uint16_t *kt = k + t * token_stride;
            if (dim == 64) scores16(64, qh, kt, token_stride, scale, s + t);
            else if (dim == 128) scores16(128, qh, kt, token_stride, scale, s + t);
            else if (dim == 256) scores16(256, qh, kt, token_stride, scale, s + t);
            else {
                __m512 z[16];
                for (int u = 0; u < 16; u++) {
                    z[u] = _mm512_setzero_ps();
                    for (int64_t d = 0; d < dim; d += 32)
                        z[u] = _mm512_dpbf16_ps(z[u], (__m512bh)_mm512_loadu_si512(qh + d),
                                                (__m512bh)_mm512_loadu_si512(kt + u * token_stride + d));
                }
                _mm512_storeu_ps(s + t, _mm512_mul_ps(sum_lanes16(z), _mm512_set1_ps(scale)));
            }
        }
        for (; t < n; t++) {
            const uint16_t *kt = k + t * token_stride;
            __m512 z = _mm512_setzero_ps();
            for (int64_t d = 0; d < dim; d += 32)
                z = _mm512_dpbf16_ps(z, (__m512bh)_mm512_loadu_si512(qh + d), (__m512bh)_mm512_loadu_si512(kt + d));
            s[t] = _mm512_reduce_add_ps(z) * scale;
        }
        return;
    }
#endif
    (void)qh; (void)bf16_path;
    float kt[MAX_D] __attribute__((aligned(64)));
    const int64_t elem = is_bf16 ? 2 : 4;
    for (int64_t t = 0; t < n; t++) {
        to_float(kt, keys + t * token_stride * elem, dim, is_bf16);
        float dot = 0.0f;
        for (int64_t d = 0; d < dim; d++) dot += qf[d] * kt[d];
        s[t] = dot * scale;
    }
}

/* One row's keys [j0, j1) → m[Hq], l[Hq], acc[Hq][D] (unnormalised). */
static void attend_range(const float *qf, const uint16_t *qh, const char *pool, const int64_t *row_pages, int64_t j0,
                         int64_t j1, int64_t bs, int64_t hkv, int64_t dim, int64_t g, float scale, int is_bf16,
                         int bf16_path, float *m, float *l, float *acc) {
    const int64_t elem = is_bf16 ? 2 : 4;
    const int64_t token_stride = hkv * dim;  /* elements from one token to the next */
    const int64_t half_bytes = bs * token_stride * elem;  /* a page's keys, or its values */
    const int64_t hq = hkv * g;
    float vbuf[TILE * MAX_D] __attribute__((aligned(64)));
    float s[TILE];
    float p_all[MAX_HQ * TILE];
    for (int64_t i = 0; i < hq; i++) { m[i] = -INFINITY; l[i] = 0.0f; }
    memset(acc, 0, (size_t)(hq * dim) * sizeof(float));
    for (int64_t j = j0; j < j1;) {
        const int64_t page_index = j / bs;
        const int64_t t0 = j % bs;
        int64_t n = (j1 - j < bs - t0) ? j1 - j : bs - t0;
        n = n < TILE ? n : TILE;
        const char *page = pool + row_pages[page_index] * 2 * half_bytes;
        if (j == j0)  /* the pages the prefetch below will not cover */
            for (int64_t a = 0; a < AHEAD && (page_index + a) * bs < j1; a++)
                prefetch(pool + row_pages[page_index + a] * 2 * half_bytes, 2 * half_bytes);
        /* the page AHEAD pages on, in Hq + 1 pieces of whole cache lines (see the top) */
        const char *ahead = (t0 == 0 && (page_index + AHEAD) * bs < j1)
                                ? pool + row_pages[page_index + AHEAD] * 2 * half_bytes : NULL;
        const int64_t piece = (2 * half_bytes / (hq + 1) + 63) / 64 * 64;
        const char *keys = page + t0 * token_stride * elem;
        const char *vals = keys + half_bytes;
        for (int64_t h = 0; h < hkv; h++) {
            for (int64_t gi = 0; gi < g; gi++) {
                const int64_t i = h * g + gi;
                if (ahead) prefetch(ahead + i * piece, piece);
                scores(qf + i * dim, qh + i * dim, keys + h * dim * elem, n, token_stride, dim, scale, is_bf16,
                       bf16_path, s);
                float mx = m[i];
                /* simd reductions: without them the compiler keeps these loops scalar (their order is fixed) */
#pragma omp simd reduction(max : mx)
                for (int64_t t = 0; t < n; t++) mx = s[t] > mx ? s[t] : mx;
                const float correction = exp_f32(m[i] - mx);  /* m = -inf on the first tile: ~0 */
                float sum = 0.0f;
                float *pi = p_all + i * TILE;
#pragma omp simd reduction(+ : sum)
                for (int64_t t = 0; t < n; t++) {
                    pi[t] = exp_f32(s[t] - mx);
                    sum += pi[t];
                }
                l[i] = l[i] * correction + sum;
                m[i] = mx;
                if (correction != 1.0f) {
                    float *ai = acc + i * dim;
                    for (int64_t d = 0; d < dim; d++) ai[d] *= correction;
                }
            }
        }
        if (ahead) prefetch(ahead + hq * piece, 2 * half_bytes - hq * piece);
#if HAVE_BF16_PATH
        if (bf16_path && dim % 64 == 0) {
            for (int64_t h = 0; h < hkv; h++)
                for (int64_t d0 = 0; d0 < dim; d0 += 64)
                    for (int64_t g0 = 0; g0 < g; g0 += 4) {
                        const uint16_t *v = (const uint16_t *)vals + h * dim + d0;
                        const float *p = p_all + (h * g + g0) * TILE;
                        float *a = acc + (h * g + g0) * dim + d0;
                        switch (g - g0 < 4 ? g - g0 : 4) {
                            case 1: values64(1, v, n, token_stride, p, a, dim); break;
                            case 2: values64(2, v, n, token_stride, p, a, dim); break;
                            case 3: values64(3, v, n, token_stride, p, a, dim); break;
                            default: values64(4, v, n, token_stride, p, a, dim); break;
                        }
                    }
            j += n;
            continue;
        }
#endif
        for (int64_t h = 0; h < hkv; h++) {
            for (int64_t t = 0; t < n; t++)
                to_float(vbuf + t * dim, vals + (t * token_stride + h * dim) * elem, dim, is_bf16);
            for (int64_t gi = 0; gi < g; gi++) {
                const int64_t i = h * g + gi;
                const float *pi = p_all + i * TILE;
                float *ai = acc + i * dim;
                for (int64_t t = 0; t < n; t++) {
                    const float p = pi[t];
                    const float *vt = vbuf + t * dim;
                    for (int64_t d = 0; d < dim; d++) ai[d] += p * vt[d];
                }
            }
        }
        j += n;
    }
}

int longfit_paged_decode(const void *q, int q_is_bf16, const void *pool, int is_bf16, const int64_t *pages,
                         const int64_t *first_key, const int64_t *seq_lens, int64_t batch, int64_t num_pages,
                         int64_t bs, int64_t hkv, int64_t dim, int64_t g, float scale, int64_t window,
                         int64_t splits, int num_threads, float *scratch, float *out) {
    const int64_t hq = hkv * g;
    if (dim > MAX_D || hq > MAX_HQ || splits < 1) return 1;
    const int bf16_path = HAVE_BF16_PATH && q_is_bf16 && is_bf16 && dim % 32 == 0;
    const int64_t rec = hq * (dim + 2);  /* scratch record: m[Hq], l[Hq], acc[Hq][D] */
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t it = 0; it < batch * splits; it++) {
        const int64_t b = it / splits;
        const int64_t sp = it % splits;
        int64_t hi = seq_lens[b] - first_key[b];
        int64_t lo = window > 0 ? hi - window : 0;
        if (hi > num_pages * bs) hi = num_pages * bs;
        if (lo < 0) lo = 0;
        /* Splits on page boundaries, as equal as whole pages allow. */
        const int64_t p0 = lo / bs, p1 = hi > lo ? (hi - 1) / bs + 1 : p0;
        const int64_t a = p0 + (p1 - p0) * sp / splits, z = p0 + (p1 - p0) * (sp + 1) / splits;
        int64_t j0 = a * bs, j1 = z * bs;
        if (j0 < lo) j0 = lo;
        if (j1 > hi) j1 = hi;
        if (j1 < j0) j1 = j0;
        float qf[MAX_HQ * MAX_D];
        const char *qrow = (const char *)q + b * hq * dim * (q_is_bf16 ? 2 : 4);
        if (!bf16_path) to_float(qf, qrow, hq * dim, q_is_bf16);
        float *r = scratch + it * rec;
        attend_range(qf, (const uint16_t *)qrow, (const char *)pool, pages + b * num_pages, j0, j1, bs, hkv, dim, g,
                     scale, is_bf16, bf16_path, r, r + hq, r + 2 * hq);
    }
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t bi = 0; bi < batch * hq; bi++) {
        const int64_t b = bi / hq, i = bi % hq;
        const float *base = scratch + b * splits * rec;
        float mx = -INFINITY;
        for (int64_t sp = 0; sp < splits; sp++) mx = base[sp * rec + i] > mx ? base[sp * rec + i] : mx;
        float total = 0.0f;
        float *o = out + bi * dim;
        memset(o, 0, (size_t)dim * sizeof(float));
        for (int64_t sp = 0; sp < splits; sp++) {
            const float *r = base + sp * rec;
            if (r[hq + i] == 0.0f) continue;  /* an empty split */
            const float w = exp_f32(r[i] - mx);
            total += w * r[hq + i];
            const float *acc = r + 2 * hq + i * dim;
            for (int64_t d = 0; d < dim; d++) o[d] += w * acc[d];
        }
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < dim; d++) o[d] *= inv;
    }
    return 0;
}
