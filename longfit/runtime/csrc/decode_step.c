/* A whole decode step of Llama-family layers in one call: for each layer, RMSNorm -> QKV product -> RoPE -> the new
 * key and value written to their pages -> paged decode attention -> output product -> residual add -> RMSNorm ->
 * gate/up product -> SiLU(gate) * up -> down product -> residual add.
 *
 * Why: at batch 1 the products and the attention (qlinear.c, paged_decode.c) are ~6 ms of a SmolLM2 step on one
 * core, and the ~20 small torch ops around them per layer (norms, RoPE, the KV write, dtype casts, the residual)
 * were ~10 ms more in eager PyTorch: each costs microseconds of dispatch for a few hundred flops. Here they are a
 * loop over the rows in C, between the same product and attention kernels the eager step calls.
 *
 * The numerics are the eager step's (longfit/models/llama.py, layers.py, attention.py), rounding for rounding: the
 * residual stream h is fp32; a norm's output, the products' outputs, the rotated q and k, the attention output,
 * SiLU(gate) and its product with up are rounded to bf16 where the eager step holds bf16 tensors; norms, RoPE and
 * SiLU compute in fp32. Tests compare the two paths step by step (tests/model/test_fused_decode.py).
 *
 * Tables (int64, C-contiguous), built by longfit/models/fused_decode.py:
 * - layers [L, L_FIELDS]: the two norms' fp32 weights [d], the sliding window (0: none), then four linears (qkv,
 *   o, gate_up, down) of LIN_FIELDS each: kind (4: int4 tiles, 8: int8 tiles), codes, d (int4) or scales (int8),
 *   m (int4), whether d and m are fp16, out features N, in features K, group G. Pointers as integers.
 * - steps [L, S_FIELDS]: this step's pages [B, P] int64, P, first keys [B] int64, lengths [B] int64, key splits.
 * h [B, d] fp32 (updated in place); cos, sin [B, D] fp32 (full-width rows: cos = [c, c], sin = [-s, s]); pool
 * [num_blocks, 2, bs, Hkv, D] bf16 or fp32; key_rows [L, B] int64: the row of each new key in the pool viewed as
 * [-1, Hkv, D] (its value bs rows later). Returns the model's output in out [B, d] bf16: the final RMSNorm (weight
 * final_norm [d] fp32) of h after the last layer.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bf16.h"
#include "fast_exp.h"

int longfit_q4_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const void *d, const void *mn,
                      int f16, int64_t N, int64_t G, int num_threads, void *out, int out_is_bf16);
int longfit_q8_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *scales,
                      int64_t N, int num_threads, void *out, int out_is_bf16);
int longfit_paged_decode(const void *q, int q_is_bf16, const void *pool, int is_bf16, const int64_t *pages,
                         const int64_t *first_key, const int64_t *seq_lens, int64_t batch, int64_t num_pages,
                         int64_t bs, int64_t hkv, int64_t dim, int64_t g, float scale, int64_t window,
                         int64_t splits, int num_threads, float *scratch, float *out);

enum { LIN_KIND, LIN_CODES, LIN_D, LIN_M, LIN_F16, LIN_N, LIN_K, LIN_G, LIN_FIELDS };
enum { L_NORM1, L_NORM2, L_WINDOW, L_LINEAR, L_FIELDS = L_LINEAR + 4 * LIN_FIELDS };
enum { QKV, O, GATE_UP, DOWN };
enum { S_PAGES, S_WIDTH, S_FIRST, S_LENS, S_SPLITS, S_FIELDS };

#define PTR(v) ((void *)(intptr_t)(v))

int longfit_fused_layout(void) { return L_FIELDS * 100 + LIN_FIELDS * 10 + S_FIELDS; }

static int linear(const int64_t *lin, const uint16_t *x, int64_t M, int threads, uint16_t *out) {
    if (lin[LIN_KIND] == 4)
        return longfit_q4_linear(x, M, lin[LIN_K], PTR(lin[LIN_CODES]), PTR(lin[LIN_D]), PTR(lin[LIN_M]),
                                 (int)lin[LIN_F16], lin[LIN_N], lin[LIN_G], threads, out, 1);
    if (lin[LIN_KIND] == 8)
        return longfit_q8_linear(x, M, lin[LIN_K], PTR(lin[LIN_CODES]), PTR(lin[LIN_D]), lin[LIN_N], threads, out, 1);
    return -3;
}

/* Start reading the next product's weight while the small ops before it run. The product kernels prefetch 8 KiB
 * ahead of their own stream, but a call's first 8 KiB waited on DRAM: 120 calls a SmolLM2 step. Warming them
 * after the previous call saved ~0.1-0.2 ms of ~3 ms of int4 layers (a C loop over SmolLM2's 120 shapes, 1 thread).
 * Parameters: the first 512 bytes of d / scales and m. */
#define WARM_BYTES 8192
static void warm(const int64_t *lin) {
    const char *codes = PTR(lin[LIN_CODES]), *d = PTR(lin[LIN_D]), *m = PTR(lin[LIN_M]);
    for (int i = 0; i < WARM_BYTES; i += 64) __builtin_prefetch(codes + i, 0, 2);
    for (int i = 0; i < 512; i += 64) {
        __builtin_prefetch(d + i, 0, 2);
        if (m) __builtin_prefetch(m + i, 0, 2);
    }
}

/* out[b] = bf16(h[b] / rms(h[b]) * w): h [B, d] fp32, w [d] fp32. */
static void rms_norm(const float *h, int64_t B, int64_t d, const float *w, float eps, uint16_t *out) {
    for (int64_t b = 0; b < B; b++) {
        const float *x = h + b * d;
        float ss = 0.0f;
        for (int64_t i = 0; i < d; i++) ss += x[i] * x[i];
        const float r = 1.0f / sqrtf(ss / (float)d + eps);
        for (int64_t i = 0; i < d; i++) out[b * d + i] = f32_to_bf16(x[i] * r * w[i]);
    }
}

/* Rotate-half RoPE of one head: out[i] = bf16(x[i]·cos[i] + x[i ± D/2]·sin[i]), x bf16 [D]; out bf16 or fp32.
 * Rounded as torch's addcmul(x * cos, swapped, sin): the first product rounded to fp32, the second fused into the
 * sum (an explicit fmaf, so that the compiler's own contraction cannot pick the other product). */
static void rope(const uint16_t *x, const float *cos, const float *sin, int64_t D, void *out, int out_bf16) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < D; i++) {
        const float first = bf16_to_f32(x[i]) * cos[i];
        const float v = fmaf(bf16_to_f32(x[i < half ? i + half : i - half]), sin[i], first);
        const uint16_t r = f32_to_bf16(v);
        if (out_bf16) ((uint16_t *)out)[i] = r;
        else ((float *)out)[i] = bf16_to_f32(r);
    }
}

static void store_head(const uint16_t *x, int64_t D, void *out, int out_bf16) {
    if (out_bf16) { memcpy(out, x, (size_t)D * 2); return; }
    for (int64_t i = 0; i < D; i++) ((float *)out)[i] = bf16_to_f32(x[i]);
}

static void add_rows(float *h, const uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) h[i] += bf16_to_f32(y[i]);
}

/* Returns 0, or: -1 shapes that do not fit, -2 out of memory, -3 an unknown linear kind, or a kernel's status. */
int longfit_fused_decode(float *h, int64_t B, int64_t d, int64_t L, const int64_t *layers, const int64_t *steps,
                         const float *cos, const float *sin, void *pool, int pool_bf16, int64_t bs, int64_t hq,
                         int64_t hkv, int64_t D, const int64_t *key_rows, float scale, float eps, int threads,
                         const float *final_norm, uint16_t *out) {
    if (B <= 0 || L <= 0 || hkv <= 0 || hq % hkv || D % 2) return -1;
    const int64_t qkv_n = (hq + 2 * hkv) * D, F = layers[L_LINEAR + GATE_UP * LIN_FIELDS + LIN_N] / 2;
    int64_t max_splits = 1;
    for (int64_t l = 0; l < L; l++) {
        const int64_t *lin = layers + l * L_FIELDS + L_LINEAR;
        const int64_t *q = lin + QKV * LIN_FIELDS, *o = lin + O * LIN_FIELDS;
        const int64_t *gu = lin + GATE_UP * LIN_FIELDS, *dn = lin + DOWN * LIN_FIELDS;
        if (q[LIN_N] != qkv_n || q[LIN_K] != d || o[LIN_N] != d || o[LIN_K] != hq * D || gu[LIN_N] != 2 * F
            || gu[LIN_K] != d || dn[LIN_N] != d || dn[LIN_K] != F)
            return -1;
        if (steps[l * S_FIELDS + S_SPLITS] > max_splits) max_splits = steps[l * S_FIELDS + S_SPLITS];
    }
    const int64_t wide = d > 2 * F ? d : 2 * F;
    uint16_t *xn = malloc((size_t)(B * (d + qkv_n + 2 * hq * D + wide + F)) * 2);
    float *att = malloc((size_t)(B * hq * D) * 4), *scratch = malloc((size_t)(B * max_splits * hq * (D + 2)) * 4);
    int status = 0;
    if (!xn || !att || !scratch) { status = -2; goto done; }
    uint16_t *qkv = xn + B * d, *qr = qkv + B * qkv_n, *ab = qr + B * hq * D, *y = ab + B * hq * D, *act = y + B * wide;
    const int64_t head_bytes = D * (pool_bf16 ? 2 : 4);
    for (int64_t l = 0; l < L && status == 0; l++) {
        const int64_t *layer = layers + l * L_FIELDS, *lin = layer + L_LINEAR, *step = steps + l * S_FIELDS;
        rms_norm(h, B, d, PTR(layer[L_NORM1]), eps, xn);
        if ((status = linear(lin + QKV * LIN_FIELDS, xn, B, threads, qkv))) break;
        warm(lin + O * LIN_FIELDS);
        for (int64_t b = 0; b < B; b++) {  /* rotate q and k; write k and v first (attention reads the new key) */
            const uint16_t *row = qkv + b * qkv_n;
            const float *c = cos + b * D, *s = sin + b * D;
            for (int64_t i = 0; i < hq; i++) rope(row + i * D, c, s, D, qr + (b * hq + i) * D, 1);
            char *key = (char *)pool + key_rows[l * B + b] * hkv * head_bytes;
            char *value = key + bs * hkv * head_bytes;
            for (int64_t j = 0; j < hkv; j++) {
                rope(row + (hq + j) * D, c, s, D, key + j * head_bytes, pool_bf16);
                store_head(row + (hq + hkv + j) * D, D, value + j * head_bytes, pool_bf16);
            }
        }
        status = longfit_paged_decode(qr, 1, pool, pool_bf16, PTR(step[S_PAGES]), PTR(step[S_FIRST]),
                                      PTR(step[S_LENS]), B, step[S_WIDTH], bs, hkv, D, hq / hkv, scale,
                                      layer[L_WINDOW], step[S_SPLITS], threads, scratch, att);
        if (status) break;
        for (int64_t i = 0; i < B * hq * D; i++) ab[i] = f32_to_bf16(att[i]);
        if ((status = linear(lin + O * LIN_FIELDS, ab, B, threads, y))) break;
        warm(lin + GATE_UP * LIN_FIELDS);
        add_rows(h, y, B * d);
        rms_norm(h, B, d, PTR(layer[L_NORM2]), eps, xn);
        if ((status = linear(lin + GATE_UP * LIN_FIELDS, xn, B, threads, y))) break;
        warm(lin + DOWN * LIN_FIELDS);
        for (int64_t b = 0; b < B; b++)
            for (int64_t f = 0; f < F; f++) {
                const float g = bf16_to_f32(y[b * 2 * F + f]);
                const float a = bf16_to_f32(f32_to_bf16(g / (1.0f + exp_f32(-g))));
                act[b * F + f] = f32_to_bf16(a * bf16_to_f32(y[b * 2 * F + F + f]));
            }
        if ((status = linear(lin + DOWN * LIN_FIELDS, act, B, threads, y))) break;
        if (l + 1 < L) warm(layers + (l + 1) * L_FIELDS + L_LINEAR + QKV * LIN_FIELDS);
        add_rows(h, y, B * d);
    }
    if (status == 0) rms_norm(h, B, d, final_norm, eps, out);
done:
    free(xn);
    free(att);
    free(scratch);
    return status;
}

int64_t longfit_head_leaders(float *logits, int64_t M, int64_t V, const uint16_t *hidden, int64_t d,
                             const uint16_t *rows, const float *row_error, float rel, float abs_);
void longfit_argmax_rows(const float *x, int64_t M, int64_t V, int64_t *out);

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Key splits per row of paged decode attention: enough work items for the threads (4 each), each split at least 4
 * pages; 1 on one thread (a split only adds a merge). native.key_splits calls this. */
int64_t longfit_key_splits(int64_t batch, int64_t num_pages, int threads) {
    if (threads <= 1 || batch >= 4 * (int64_t)threads) return 1;
    const int64_t want = (4 * (int64_t)threads + batch - 1) / batch, cap = num_pages / 4;
    const int64_t splits = want < cap ? want : cap;
    return splits > 1 ? splits : 1;
}

/* Up to S greedy decode steps of B rows in one call (runtime/decode_loop.py: multi-step decoding), each what the
 * runner's own step computes: the embedding row (bf16, widened), the fused layers above, the int8 LM head rounded to
 * bf16 and widened, its leaders rescored (head.c), the first argmax. Between steps only integers move: each step's
 * key rows, lengths, page count and RoPE rows are the caller's, built for all steps at once.
 *
 * tables [L, B, W] int64: every step's pages (a step reads its first widths[s]; W is the row stride); key_rows
 * [S, L, B]; seq_lens [S, B] (keys including the new one); cos, sin [S, B, D] fp32; embed [V, d] bf16; head codes
 * and scales in the int8 tile layout (qlinear.c), rows [V, d] bf16 the exact weights (NULL: no rescoring, as
 * compute_logits without them), row_error [V] fp32 or NULL;
 * stops [B, num_stops] int64 (-1: none) and due [B]: a row's stop token ends the loop once the step's number (from
 * 1) reaches due[b], and so does a step that ends max_seconds or more after the call began (a stream's tokens are
 * not held back long). tokens [S + 1, B] int64: row 0 the inputs, step s writes row s + 1.
 * Returns the steps done (1..S), or a negative status: -1 a token outside [0, V), -2 out of memory, -3 a kernel
 * refused its inputs. */
int64_t longfit_decode_greedy(int64_t S, int64_t B, int64_t d, int64_t L, const int64_t *layers,
                              const int64_t *tables, int64_t W, const int64_t *widths, const int64_t *key_rows,
                              const int64_t *seq_lens, const float *cos, const float *sin, void *pool, int pool_bf16,
                              int64_t bs, int64_t hq, int64_t hkv, int64_t D, float scale, float eps, int threads,
                              const float *final_norm, const uint16_t *embed, const uint8_t *head_codes,
                              const uint16_t *head_scales, int64_t V, const uint16_t *rows, const float *row_error,
                              float rel, float abs_, const int64_t *stops, int64_t num_stops, const int64_t *due,
                              double max_seconds, int64_t *tokens) {
    const double started = seconds_now();
    float *h = malloc((size_t)(B * d) * 4), *logits = malloc((size_t)(B * V) * 4);
    uint16_t *hidden = malloc((size_t)(B * d) * 2), *head = malloc((size_t)(B * V) * 2);
    int64_t *steps = malloc((size_t)(L * S_FIELDS) * 8), *first = calloc((size_t)B, 8);
    int64_t done = -2;
    if (!h || !logits || !hidden || !head || !steps || !first) goto out;
    for (int64_t s = 0; s < S; s++) {
        const int64_t *in = tokens + s * B;
        for (int64_t b = 0; b < B; b++) {
            if (in[b] < 0 || in[b] >= V) { done = -1; goto out; }
            for (int64_t i = 0; i < d; i++) h[b * d + i] = bf16_to_f32(embed[in[b] * d + i]);
        }
        const int64_t splits = longfit_key_splits(B, widths[s], threads);
        for (int64_t l = 0; l < L; l++) {
            int64_t *step = steps + l * S_FIELDS;
            step[S_PAGES] = (int64_t)(intptr_t)(tables + l * B * W);
            step[S_WIDTH] = W;
            step[S_FIRST] = (int64_t)(intptr_t)first;
            step[S_LENS] = (int64_t)(intptr_t)(seq_lens + s * B);
            step[S_SPLITS] = splits;
        }
        int status = longfit_fused_decode(h, B, d, L, layers, steps, cos + s * B * D, sin + s * B * D, pool, pool_bf16,
                                          bs, hq, hkv, D, key_rows + s * L * B, scale, eps, threads, final_norm,
                                          hidden);
        if (status == 0) status = longfit_q8_linear(hidden, B, d, head_codes, head_scales, V, threads, head, 1);
        if (status != 0) { done = -3; goto out; }
        for (int64_t i = 0; i < B * V; i++) logits[i] = bf16_to_f32(head[i]);
        if (rows && longfit_head_leaders(logits, B, V, hidden, d, rows, row_error, rel, abs_) < 0) {
            done = -3;
            goto out;
        }
        int64_t *next = tokens + (s + 1) * B;
        longfit_argmax_rows(logits, B, V, next);
        done = s + 1;
        int stop = 0;
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < num_stops; j++)
                stop |= stops[b * num_stops + j] == next[b] && s + 1 >= due[b];
        if (stop || seconds_now() - started > max_seconds) break;
    }
out:
    free(h);
    free(logits);
    free(hidden);
    free(head);
    free(steps);
    free(first);
    return done;
}
