/*
 * roofline.c - the two machine numbers the benchmark's roofline needs, measured in the same
 * run as the model benchmarks:
 *
 *   (a) read bandwidth (GB/s) over a buffer of a given size with a given number of threads:
 *       each thread sums its slice of the buffer with 256-bit AVX2 loads into 8 independent
 *       accumulators, prefetching 8 KB ahead, pass after pass; the best pass over a time
 *       budget is reported ("gbs":
 *       back-to-back passes, so a buffer that fits in the L3 is read from it), and the median
 *       of passes that each follow a read of an eviction buffer four times larger (at least
 *       64 MiB), so the buffer comes from memory ("cold_gbs": what a decode step gets when the
 *       rest of the step, or a neighbour, has pushed the weights out of the cache);
 *   (b) peak single-precision FMA throughput (GFLOP/s) with a given number of threads:
 *       12 independent 8-wide FMA chains per thread (enough to cover FMA latency x pipes),
 *       2 FLOP per lane per FMA.
 *
 * AVX2/FMA code is compiled per function with __attribute__((target(...))) and picked at run
 * time with __builtin_cpu_supports, so the file builds with a plain `cc -O2 -fopenmp` and
 * still runs (with portable loops, reported as such) on a machine without AVX2.
 *
 * Usage:  roofline [-m MS] [-b BYTES]... [-t THREADS]... [-f]
 *   -m MS      time budget per measurement in milliseconds (default 300)
 *   -b BYTES   a buffer size to measure bandwidth over (repeatable)
 *   -t N       a thread count (repeatable; default 1)
 *   -f         also measure FMA peak for every thread count
 * Output: one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define X86 1
#else
#define X86 0
#endif

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int have_avx2_fma(void) {
#if X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------ read bandwidth */

#if X86
/* Software prefetch this far ahead, as the runtime's decode kernels do (src/kernels.c). */
#define PREFETCH_FLOATS 2048
__attribute__((target("avx2"))) static float sum_avx2(const float *p, size_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        _mm_prefetch((const char *)(p + i + PREFETCH_FLOATS), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + i + PREFETCH_FLOATS + 16), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + i + PREFETCH_FLOATS + 32), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + i + PREFETCH_FLOATS + 48), _MM_HINT_T0);
        a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
        a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
        a4 = _mm256_add_ps(a4, _mm256_load_ps(p + i + 32));
        a5 = _mm256_add_ps(a5, _mm256_load_ps(p + i + 40));
        a6 = _mm256_add_ps(a6, _mm256_load_ps(p + i + 48));
        a7 = _mm256_add_ps(a7, _mm256_load_ps(p + i + 56));
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    float total = 0.0f;
    for (int k = 0; k < 8; k++) total += lanes[k];
    for (; i < n; i++) total += p[i];
    return total;
}
#endif

static float sum_portable(const float *p, size_t n) {
    float a[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) a[k] += p[i + k];
    float total = 0.0f;
    for (int k = 0; k < 8; k++) total += a[k];
    for (; i < n; i++) total += p[i];
    return total;
}

static volatile float sink;

/* One pass: every thread sums its slice; returns the wall time between barriers. */
static double pass(const float *buf, size_t n, int threads, int avx2) {
    double t0 = 0.0, t1 = 0.0;
#pragma omp parallel num_threads(threads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        size_t slice = n / (size_t)nt, lo = slice * (size_t)t;
#pragma omp barrier
#pragma omp master
        t0 = now();
#pragma omp barrier
        float acc;
#if X86
        acc = avx2 ? sum_avx2(buf + lo, slice) : sum_portable(buf + lo, slice);
#else
        (void)avx2;
        acc = sum_portable(buf + lo, slice);
#endif
#pragma omp barrier
#pragma omp master
        t1 = now();
#pragma omp critical
        sink += acc;
    }
    return t1 - t0;
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Reads one float per cache line of evict (n floats): afterwards the caches hold it, not
 * what was read before. */
static void evict_caches(const float *evict, size_t n) {
    float acc = 0.0f;
    for (size_t i = 0; i < n; i += 16) acc += evict[i];
    sink += acc;
}

#define COLD_PASSES 64

typedef struct {
    double warm_gbs; /* best back-to-back pass */
    double cold_gbs; /* median pass after evicting the caches */
} read_bandwidth;

/* GB/s of full passes over bytes with threads threads: back-to-back passes for about ms,
 * then passes after an eviction for about ms more (at least 3 of each). */
static read_bandwidth bandwidth(size_t bytes, int threads, double ms, int avx2) {
    read_bandwidth out = {-1.0, -1.0};
    size_t n = bytes / sizeof(float);
    n -= n % (64 * (size_t)threads); /* equal slices of whole 64-float blocks */
    if (n == 0) n = 64 * (size_t)threads;
    size_t n_evict = 4 * n > ((size_t)64 << 20) / sizeof(float) ? 4 * n : ((size_t)64 << 20) / sizeof(float);
    float *buf = aligned_alloc(64, n * sizeof(float));
    float *evict = malloc(n_evict * sizeof(float));
    if (!buf || !evict) {
        free(buf);
        free(evict);
        return out;
    }
    /* written once so that it owns real pages (untouched pages all map the one zero page,
     * and reading them would evict nothing) */
    for (size_t i = 0; i < n_evict; i++) evict[i] = 1.0f;
#pragma omp parallel num_threads(threads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        size_t slice = n / (size_t)nt, lo = slice * (size_t)t;
        /* first touch by the thread that will read the slice; small exact values */
        for (size_t i = lo; i < lo + slice; i++) buf[i] = (float)(i & 7) * 0.125f;
    }
    pass(buf, n, threads, avx2); /* warm-up: caches, TLB, thread pool */
    double best = 1e30, t_end = now() + ms * 1e-3;
    int passes = 0;
    do {
        double dt = pass(buf, n, threads, avx2);
        if (dt > 0 && dt < best) best = dt;
        passes++;
    } while (now() < t_end || passes < 3);
    double cold[COLD_PASSES];
    int n_cold = 0;
    t_end = now() + ms * 1e-3;
    do {
        evict_caches(evict, n_evict);
        cold[n_cold++] = pass(buf, n, threads, avx2);
    } while (n_cold < COLD_PASSES && (now() < t_end || n_cold < 3));
    qsort(cold, (size_t)n_cold, sizeof *cold, compare_doubles);
    free(buf);
    free(evict);
    out.warm_gbs = (double)(n * sizeof(float)) / best * 1e-9;
    out.cold_gbs = (double)(n * sizeof(float)) / cold[n_cold / 2] * 1e-9;
    return out;
}

/* ------------------------------------------------------------------ FMA peak */

#define CHAINS 12

#if X86
__attribute__((target("avx2,fma"))) static float fma_avx2(long iters, float seed) {
    __m256 acc[CHAINS];
    const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f * seed);
    for (int k = 0; k < CHAINS; k++) acc[k] = _mm256_set1_ps(seed + (float)k);
    for (long i = 0; i < iters; i++) {
        /* all CHAINS FMAs are independent of each other; each chain's latency is hidden */
        acc[0] = _mm256_fmadd_ps(acc[0], a, b);
        acc[1] = _mm256_fmadd_ps(acc[1], a, b);
        acc[2] = _mm256_fmadd_ps(acc[2], a, b);
        acc[3] = _mm256_fmadd_ps(acc[3], a, b);
        acc[4] = _mm256_fmadd_ps(acc[4], a, b);
        acc[5] = _mm256_fmadd_ps(acc[5], a, b);
        acc[6] = _mm256_fmadd_ps(acc[6], a, b);
        acc[7] = _mm256_fmadd_ps(acc[7], a, b);
        acc[8] = _mm256_fmadd_ps(acc[8], a, b);
        acc[9] = _mm256_fmadd_ps(acc[9], a, b);
        acc[10] = _mm256_fmadd_ps(acc[10], a, b);
        acc[11] = _mm256_fmadd_ps(acc[11], a, b);
    }
    __m256 s = acc[0];
    for (int k = 1; k < CHAINS; k++) s = _mm256_add_ps(s, acc[k]);
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    return lanes[0] + lanes[7];
}
#endif

static float fma_portable(long iters, float seed) {
    float acc[CHAINS * 8];
    for (int k = 0; k < CHAINS * 8; k++) acc[k] = seed + (float)k;
    for (long i = 0; i < iters; i++)
        for (int k = 0; k < CHAINS * 8; k++) acc[k] = acc[k] * 0.999999f + 1e-7f;
    float s = 0.0f;
    for (int k = 0; k < CHAINS * 8; k++) s += acc[k];
    return s;
}

/* Best GFLOP/s over repeated blocks for about ms, all threads running blocks together. */
static double fma_peak(int threads, double ms, int avx2) {
    const long iters = 1L << 20; /* 12 * 8 * 2 * 2^20 = 201 MFLOP per thread per block */
    double best = 1e30;
    double t_end = now() + ms * 1e-3;
    int blocks = 0;
    do {
        double t0 = 0.0, t1 = 0.0;
#pragma omp parallel num_threads(threads)
        {
            float r;
#pragma omp barrier
#pragma omp master
            t0 = now();
#pragma omp barrier
#if X86
            r = avx2 ? fma_avx2(iters, 1.0f) : fma_portable(iters / 8, 1.0f);
#else
            r = fma_portable(iters / 8, 1.0f);
#endif
#pragma omp barrier
#pragma omp master
            t1 = now();
#pragma omp critical
            sink += r;
        }
        if (t1 - t0 < best) best = t1 - t0;
        blocks++;
    } while (now() < t_end || blocks < 3);
    double flops_per_thread = avx2 ? (double)iters * CHAINS * 8 * 2 : (double)(iters / 8) * CHAINS * 8 * 2;
    return flops_per_thread * threads / best * 1e-9;
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv) {
    double ms = 300.0;
    size_t sizes[16];
    int n_sizes = 0, thread_list[8], n_threads = 0, do_fma = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) ms = atof(argv[++i]);
        else if (!strcmp(argv[i], "-b") && i + 1 < argc && n_sizes < 16) sizes[n_sizes++] = (size_t)atoll(argv[++i]);
        else if (!strcmp(argv[i], "-t") && i + 1 < argc && n_threads < 8) thread_list[n_threads++] = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-f")) do_fma = 1;
        else {
            fprintf(stderr, "usage: roofline [-m MS] [-b BYTES]... [-t THREADS]... [-f]\n");
            return 1;
        }
    }
    if (!n_threads) thread_list[n_threads++] = 1;
    int avx2 = have_avx2_fma();
    int max_threads = 1;
#ifdef _OPENMP
    max_threads = omp_get_num_procs();
    omp_set_dynamic(0);
#endif
    printf("{\"avx2_fma\": %s, \"openmp\": %s, \"max_threads\": %d, \"ms\": %.0f,\n",
           avx2 ? "true" : "false",
#ifdef _OPENMP
           "true",
#else
           "false",
#endif
           max_threads, ms);
    printf(" \"bandwidth_gbs\": [");
    int first = 1;
    for (int s = 0; s < n_sizes; s++)
        for (int k = 0; k < n_threads; k++) {
            int t = thread_list[k];
#ifndef _OPENMP
            if (t != 1) continue;
#endif
            read_bandwidth bw = bandwidth(sizes[s], t, ms, avx2);
            printf("%s\n  {\"bytes\": %zu, \"threads\": %d, \"gbs\": %.3f, \"cold_gbs\": %.3f}", first ? "" : ",",
                   sizes[s], t, bw.warm_gbs, bw.cold_gbs);
            first = 0;
            fflush(stdout);
        }
    printf("],\n \"fma_gflops\": [");
    first = 1;
    if (do_fma)
        for (int k = 0; k < n_threads; k++) {
            int t = thread_list[k];
#ifndef _OPENMP
            if (t != 1) continue;
#endif
            printf("%s\n  {\"threads\": %d, \"gflops\": %.3f}", first ? "" : ",", t, fma_peak(t, ms, avx2));
            first = 0;
            fflush(stdout);
        }
    printf("]}\n");
    return 0;
}
