/* The LM head's leading candidates recomputed exactly, for DecoderModel.compute_logits (longfit/models/base.py).
 *
 * A bf16 or int8 head moves each logit by a bounded amount (bf16 output rounding; the int8 codes' error, per row
 * err[v] = row_error[v] · Σ|x|). Every token whose upper end reaches the best lower end may be the true leader; those
 * are recomputed in fp32 from the exact [V, d] rows. In torch that is ~10 ops over [M, V] (max, outer product, two
 * comparisons, nonzero, gathers), ~0.3-0.4 ms of a ~6.7 ms batch-1 SmolLM2 step on one core; here it is three
 * passes over the row in C, ~0.03 ms.
 *
 * Same rule as the torch path it replaces (tests compare them): rounding = |top| · rel + abs, with top the row's
 * largest logit; without row_error, leaders are the logits >= top - rounding; with it, err[v] = s · row_error[v] +
 * rounding (s = Σ|x|), best_lower = max(logit - err), leaders are logit + err >= best_lower. A row holding a NaN is
 * left as it is (torch's max is NaN there, and no comparison holds). The exact logit is Σ x·w in fp32 (bf16 × bf16
 * products are exact; the sum's order is the compiler's, so it may differ from torch's in the last bits).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "bf16.h"

#define BLOCK 16 /* logits tested at a time for leaders: a block without one costs a few vector instructions */

static float exact_dot(const uint16_t *x, const uint16_t *w, int64_t d) {
    float s = 0.0f;
    for (int64_t k = 0; k < d; k++) s += bf16_to_f32(x[k]) * bf16_to_f32(w[k]);
    return s;
}

/* Whether logit v may be the leader: its upper end row[v] + s · row_error[v] + rounding reaches best_lower; without
 * row_error, row[v] itself does (best_lower is then top - rounding). */
static inline int leads(const float *row, const float *row_error, int64_t v, float s, float rounding,
                        float best_lower) {
    return (row_error ? s * row_error[v] + rounding : 0.0f) + row[v] >= best_lower;
}

/* max over v of row[v] - (s · row_error[v] + rounding), or of row[v] - rounding without row_error; *nan set when
 * the row holds a NaN. The simd reductions vectorize it (plain C
 * loops with a running maximum do not: the compiler keeps their order). */
static float lower_max(const float *row, int64_t V, const float *row_error, float s, float rounding, int *nan) {
    float top = -INFINITY;
    int bad = 0;
    if (row_error) {
#pragma omp simd reduction(max : top) reduction(| : bad)
        for (int64_t v = 0; v < V; v++) {
            const float x = row[v] - (s * row_error[v] + rounding);
            top = x > top ? x : top;
            bad |= row[v] != row[v];
        }
    } else {
#pragma omp simd reduction(max : top) reduction(| : bad)
        for (int64_t v = 0; v < V; v++) {
            const float x = row[v] - rounding;
            top = x > top ? x : top;
            bad |= row[v] != row[v];
        }
    }
    *nan |= bad;
    return top;
}

/* logits [M, V] fp32 (rescored in place); hidden [M, d] bf16; rows [V, d] bf16; row_error [V] fp32 or NULL.
 * Returns how many logits were recomputed, or -1 for bad shapes. */
int64_t longfit_head_leaders(float *logits, int64_t M, int64_t V, const uint16_t *hidden, int64_t d,
                             const uint16_t *rows, const float *row_error, float rel, float abs_) {
    if (M < 0 || V <= 0 || d <= 0) return -1;
    int64_t count = 0;
    for (int64_t m = 0; m < M; m++) {
        float *row = logits + m * V;
        const uint16_t *x = hidden + m * d;
        int nan = 0;
        const float top = lower_max(row, V, NULL, 0.0f, 0.0f, &nan);
        if (nan) continue;
        const float rounding = fabsf(top) * rel + abs_;
        float s = 0.0f;
        for (int64_t k = 0; row_error && k < d; k++) s += fabsf(bf16_to_f32(x[k]));
        const float best_lower = row_error ? lower_max(row, V, row_error, s, rounding, &nan) : top - rounding;
        for (int64_t v = 0; v < V; v += BLOCK) {
            const int64_t end = V - v < BLOCK ? V : v + BLOCK;
            int any = 0;
            for (int64_t u = v; u < end; u++) any |= leads(row, row_error, u, s, rounding, best_lower);
            if (!any) continue;
            for (int64_t u = v; u < end; u++)
                if (leads(row, row_error, u, s, rounding, best_lower)) {
                    row[u] = exact_dot(x, rows + u * d, d);
                    count++;
                }
        }
    }
    return count;
}

/* out[m] = the first index of row m's largest value, a NaN counting as largest (torch's max(dim).indices), for
 * x [M, V] fp32: the greedy sampler's argmax, ~10x faster than torch's on one core at V = 49152. */
void longfit_argmax_rows(const float *x, int64_t M, int64_t V, int64_t *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * V;
        int nan = 0;
        const float top = lower_max(row, V, NULL, 0.0f, 0.0f, &nan);
        int64_t v = 0;
        if (nan)
            while (row[v] == row[v]) v++;
        else
            while (v < V - 1 && row[v] != top) v++;
        out[m] = v;
    }
}
