/* How fast the packed-weight kernels stream one SmolLM2 decode step's weights, against a plain read of memory,
 * with no Python around the calls (docs/PERFORMANCE.md, "Multi-step decoding", "8-bit activations"):
 *
 *   gcc -O3 -march=native -fopenmp -fno-math-errno -fassociative-math -fno-signed-zeros -fno-trapping-math \
 *       -o /tmp/kernel_stream scripts/kernel_stream.c longfit/runtime/csrc/qlinear.c -lm
 *   taskset -c 1 /tmp/kernel_stream [passes] [rows]
 *
 * Each pass, 1 thread, 1 activation row (`rows`, up to 512, for the first two): the 120 int4 products of SmolLM2's
 * 30 layers (q/k/v 960x576, o 576x576, gate/up 3072x576, down 576x1536, groups of 32, fp16 d and m), each weight
 * read once from DRAM (63 MiB a pass); the int8 LM head 49152x576; the o-shape product 10 times over one weight held
 * in L2 (the kernel's compute rate); and a sum over 512 MiB of fp32 with AVX-512 loads (what one core reads from
 * DRAM). Weights are random: the time does not depend on the values. Rates are bytes read (codes and parameters)
 * per second, and weights per second for the L2 row. Adding -DQ4_BF16_MIN_ROWS=N to the build moves the row count
 * from which int4 products take bf16 products (qlinear.c).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int longfit_q4_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const void *d, const void *mn,
                      int f16, int64_t N, int64_t G, int num_threads, void *out, int out_is_bf16);
int longfit_q8_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *scales,
                      int64_t N, int num_threads, void *out, int out_is_bf16);

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static const int64_t SHAPES[4][2] = {{960, 576}, {576, 576}, {3072, 576}, {576, 1536}}; /* [out, in] */
enum { LAYERS = 120, GROUP = 32, VOCAB = 49152, DIM = 576, L2_REPEATS = 10 };
#define READ_BYTES ((size_t)512 << 20)

int main(int argc, char **argv) {
    const int passes = argc > 1 ? atoi(argv[1]) : 10, rows = argc > 2 ? atoi(argv[2]) : 1;
    if (passes < 1 || rows < 1 || rows > 512) {
        fprintf(stderr, "usage: kernel_stream [passes >= 1] [rows in 1..512]\n");
        return 1;
    }
    uint8_t *codes[LAYERS];
    uint16_t *d[LAYERS], *m[LAYERS];
    size_t int4_bytes = 0;
    srand(1);
    for (int i = 0; i < LAYERS; i++) {
        const size_t n = (size_t)(SHAPES[i % 4][0] * SHAPES[i % 4][1]);
        codes[i] = aligned_alloc(64, n / 2);
        d[i] = aligned_alloc(64, n / GROUP * 2 + 64);
        m[i] = aligned_alloc(64, n / GROUP * 2 + 64);
        for (size_t j = 0; j < n / 2; j++) codes[i][j] = (uint8_t)rand();
        for (size_t j = 0; j < n / GROUP; j++) {
            d[i][j] = (uint16_t)(0x2000 + (rand() & 0xff)); /* small positive fp16 */
            m[i][j] = (uint16_t)(0xa000 + (rand() & 0xff)); /* small negative fp16 */
        }
        int4_bytes += n / 2 + n / GROUP * 4;
    }
    uint8_t *head = aligned_alloc(64, (size_t)VOCAB * DIM);
    uint16_t *scales = aligned_alloc(64, (size_t)VOCAB * 2);
    for (size_t j = 0; j < (size_t)VOCAB * DIM; j++) head[j] = (uint8_t)rand();
    for (int j = 0; j < VOCAB; j++) scales[j] = 0x3c00;
    const size_t head_bytes = (size_t)VOCAB * DIM + (size_t)VOCAB * 2;
    uint16_t *x = malloc((size_t)rows * 1536 * 2);
    for (int j = 0; j < rows * 1536; j++) x[j] = (uint16_t)(0x3f80 + (rand() & 0x7f)); /* bf16 in [1, 2) */
    uint16_t *out = malloc((size_t)rows * VOCAB * 2);
    float *big = aligned_alloc(64, READ_BYTES);
    memset(big, 0, READ_BYTES);
    const int64_t o_n = SHAPES[1][0], o_k = SHAPES[1][1];
    printf("%-5s %22s %22s %24s %16s\n", "pass", "120 int4 ms (GB/s)", "int8 head ms (GB/s)",
           "o in L2 us (G weights/s)", "read GB/s");
    for (int pass = 0; pass < passes; pass++) {
        const double t0 = now();
        for (int i = 0; i < LAYERS; i++)
            longfit_q4_linear(x, rows, SHAPES[i % 4][1], codes[i], d[i], m[i], 1, SHAPES[i % 4][0], GROUP, 1, out, 1);
        const double t1 = now();
        longfit_q8_linear(x, rows, DIM, head, scales, VOCAB, 1, out, 1);
        const double t2 = now();
        for (int r = 0; r < L2_REPEATS; r++)
            longfit_q4_linear(x, 1, o_k, codes[1], d[1], m[1], 1, o_n, GROUP, 1, out, 1);
        const double t3 = now();
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        for (size_t j = 0; j < READ_BYTES / 4; j += 32) {
            s0 = _mm512_add_ps(s0, _mm512_load_ps(big + j));
            s1 = _mm512_add_ps(s1, _mm512_load_ps(big + j + 16));
        }
        const double t4 = now();
        const float sink = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
        const double l2 = (t3 - t2) / L2_REPEATS;
        printf("%-5d %14.3f (%5.1f) %14.3f (%5.1f) %16.2f (%5.1f) %16.1f%s\n", pass, (t1 - t0) * 1e3,
               int4_bytes / (t1 - t0) / 1e9, (t2 - t1) * 1e3, head_bytes / (t2 - t1) / 1e9, l2 * 1e6,
               (double)(o_n * o_k) / l2 / 1e9, READ_BYTES / (t4 - t3) / 1e9, sink == 1.0f ? " " : "");
    }
    return 0;
}
