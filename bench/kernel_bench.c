/*
 * kernel_bench.c - the matrix kernels alone, every kernel set the CPU has, on the persona's
 * matrix shapes: GFLOP/s of the fastest of many repetitions (the minimum time is what the code
 * can do; slower repetitions measure whatever else the machine was doing).
 *
 *   cc -O3 -pthread -Isrc -o kernel_bench bench/kernel_bench.c src/kernels*.c -lm
 *
 * (-O3 as the library is built: at -O2 some kernels run at half the speed.)
 *   kernel_bench [-T TOKENS]... [-s SET]... [-r REPEATS] [-c COPIES]
 *
 * The weights of a shape are read once per repetition: T = 1 (decode) waits on the cache or
 * memory level they sit in (all five shapes together are the persona's 28.6 MB of float32
 * weights), T > 1 (prefill, batched decode) on arithmetic.  -c COPIES cycles through that many
 * copies of each matrix, so that they come from the L3 (or memory) as in a forward pass
 * rather than from L2.  Times are the thread's CPU time,
 * so that the time a busy machine gives to other processes does not count.
 */
#define _GNU_SOURCE
#include "kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    const char *name;
    int rows, n;
} shape;

/* LLiSA-7M: dim 288, hidden 768, vocab 4096 (q, k, v stacked as one product), and one head's
 * attention scores at the last position (256 cached keys of head_size 48). */
static const shape shapes[] = {{"wqkv", 864, 288}, {"wo", 288, 288}, {"w1", 768, 288}, {"w2", 288, 768},
                               {"wcls", 4096, 288}, {"keys", 256, 48}};
#define N_SHAPES (int)(sizeof shapes / sizeof shapes[0])

/* Buffers start on a cache line, as the library's weights and activations do (a 64-byte load
 * across two lines costs the float32 GEMM up to 1.6x). */
static void *lines(size_t bytes) { return aligned_alloc(64, (bytes + 63) & ~(size_t)63); }

static float frand(unsigned *state) {
    *state = *state * 1664525u + 1013904223u;
    return (float)((*state >> 8) & 0xFFFF) / 32768.0f - 1.0f;
}

int main(int argc, char **argv) {
    int tokens[8], n_tokens = 0, repeats = 50, copies = 1;
    const char *sets[8];
    int n_sets = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-T") && i + 1 < argc && n_tokens < 8) tokens[n_tokens++] = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-s") && i + 1 < argc && n_sets < 8) sets[n_sets++] = argv[++i];
        else if (!strcmp(argv[i], "-r") && i + 1 < argc) repeats = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-c") && i + 1 < argc) copies = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: kernel_bench [-T TOKENS]... [-s SET]... [-r REPEATS] [-c COPIES]\n");
            return 1;
        }
    }
    if (copies < 1 || copies > 64) {
        fprintf(stderr, "kernel_bench: -c must be in 1..64\n");
        return 1;
    }
    if (!n_tokens) {
        tokens[n_tokens++] = 1;
        tokens[n_tokens++] = 16;
        tokens[n_tokens++] = 64;
    }
    if (!n_sets) sets[n_sets++] = ac_kernels_get()->name; /* the set this CPU gets */
    int max_t = 0;
    for (int k = 0; k < n_tokens; k++) max_t = tokens[k] > max_t ? tokens[k] : max_t;
    size_t max_w = 0;
    for (int s = 0; s < N_SHAPES; s++)
        if ((size_t)shapes[s].rows * shapes[s].n > max_w) max_w = (size_t)shapes[s].rows * shapes[s].n;
    max_w *= (size_t)copies;
    float *W = lines(max_w * sizeof(float)), *X = lines((size_t)max_t * 768 * sizeof(float));
    float *out = lines((size_t)max_t * 4096 * sizeof(float)), *Ws = lines(max_w / 32 * sizeof(float));
    float *Xs = lines((size_t)max_t * 768 / 32 * sizeof(float));
    int8_t *Wq = lines(max_w), *Xq = lines((size_t)max_t * 768);
    if (!W || !X || !out || !Ws || !Xs || !Wq || !Xq) return 1;
    unsigned seed = 1;
    for (size_t i = 0; i < max_w; i++) W[i] = frand(&seed) * 0.05f;
    for (size_t i = 0; i < (size_t)max_t * 768; i++) X[i] = frand(&seed);
    ac_quantize_q8(Wq, Ws, W, (int)max_w, 32);
    printf("%-12s %-5s %4s %6s %10s %10s\n", "set", "shape", "T", "dtype", "GFLOP/s", "us");
    for (int si = 0; si < n_sets; si++) {
        const ac_kernels *k = ac_kernels_named(sets[si]);
        if (!k) {
            fprintf(stderr, "kernel_bench: %s is not a kernel set this CPU can run\n", sets[si]);
            return 1;
        }
        for (int ti = 0; ti < n_tokens; ti++)
            for (int q = 0; q < 2; q++)
                for (int s = 0; s < N_SHAPES; s++) {
                    int T = tokens[ti], rows = shapes[s].rows, n = shapes[s].n;
                    if (q && !strcmp(shapes[s].name, "keys")) continue; /* the KV cache is float32 */
                    if (q) ac_quantize_q8(Xq, Xs, X, T * n, 32);
                    /* int8 weights in the set's own layout where it has one, as the model packs them */
                    size_t packed_bytes = q && k->packed_q8_bytes ? k->packed_q8_bytes(rows, n, 32) : 0;
                    unsigned char *packed = packed_bytes ? lines(packed_bytes * copies) : NULL;
                    if (packed_bytes && !packed) return 1;
                    for (int c = 0; packed && c < copies; c++)
                        k->pack_q8(packed + c * packed_bytes, Wq + (size_t)c * rows * n, Ws + (size_t)c * rows * n / 32, rows,
                                   n, 32);
                    double best = 1e30;
                    for (int r = 0; r < repeats; r++) {
                        size_t copy = (size_t)(r % copies) * rows * n; /* the copy for this repetition */
                        double t0 = now();
                        if (packed)
                            k->gemm_q8(out, rows, (const int8_t *)(packed + (size_t)(r % copies) * packed_bytes), NULL, Xq, Xs,
                                       T, n, 32, 0, rows);
                        else if (q) k->gemm_q8(out, rows, Wq + copy, Ws + copy / 32, Xq, Xs, T, n, 32, 0, rows);
                        else k->gemm_f32(out, rows, W + copy, n, X, n, T, n, 0, rows);
                        double dt = now() - t0;
                        if (dt > 0 && dt < best) best = dt; /* a VM's thread clock can read 0 for a short call */
                    }
                    free(packed);
                    printf("%-12s %-5s %4d %6s %10.1f %10.1f\n", k->name, shapes[s].name, T, q ? "int8" : "f32",
                           2.0 * rows * n * T / best * 1e-9, best * 1e6);
                }
    }
    return 0;
}
