/*
 * roofline.c - the two machine numbers the benchmark's roofline needs, measured in the same
 * run as the model benchmarks:
 *
 *   (a) read bandwidth (GB/s) over a buffer of a given size with a given number of threads:
 *       each thread sums its slice of the buffer with the widest vector loads the CPU has
 *       (AVX-512 or AVX2) into 8 independent accumulators, prefetching 8 KB ahead as the
 *       runtime's decode kernels do, pass after pass.  Reported: the best pass over a time
 *       budget ("gbs": back-to-back passes, so a buffer that fits in the L3 is read from it),
 *       and the best of passes that each follow a read of an eviction buffer (four times the
 *       buffer, twice the L3, at least 64 MiB: the largest), so the buffer comes from memory
 *       ("cold_gbs": what a decode step gets when the rest of the step, or a neighbour, has
 *       pushed the weights out);
 *   (b) peak single-precision FMA throughput (GFLOP/s) with a given number of threads:
 *       12 independent FMA chains per thread (enough to cover FMA latency x pipes) of the
 *       widest vectors the CPU has, 2 FLOP per lane per FMA.
 *
 * Threads: one pthread per thread count, each pinned to its own CPU of the process's set,
 * started once per measurement.  Every pass begins at a spinning barrier, so all threads are
 * running when it starts, and lasts from the earliest thread's start to the latest thread's
 * end.  A thread that the OS takes off its CPU in the middle of a pass (on a busy machine)
 * makes that pass slow, and the best pass leaves it out.  (Passes that started from a sleep,
 * as OpenMP's team wake-up allows, measured the wake-up on a busy 2-core machine: 5 GB/s for
 * 2 threads against 24 for one.)
 *
 * Vector code is compiled per function with __attribute__((target(...))) and picked at run
 * time, so the file builds with a plain `cc -O2 -pthread` and runs (with portable loops,
 * reported as such) on any CPU.
 *
 * Usage:  roofline [-m MS] [-b BYTES]... [-t THREADS]... [-f] [-i ISA]
 *   -m MS      time budget per measurement in milliseconds (default 300)
 *   -b BYTES   a buffer size to measure bandwidth over (repeatable)
 *   -t N       a thread count (repeatable; default 1)
 *   -f         also measure FMA peak for every thread count
 *   -i ISA     avx512, avx2 or portable instead of the widest the CPU has
 * Output: one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define X86 1
#else
#define X86 0
#endif

#define MAX_THREADS 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The vector width used: "avx512" (16 floats), "avx2" (8) or "portable". */
typedef enum { ISA_PORTABLE, ISA_AVX2, ISA_AVX512 } isa;
static const char *isa_names[] = {"portable", "avx2", "avx512"};

static isa detect_isa(void) {
#if X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
    return ISA_PORTABLE;
}

/* ------------------------------------------------------------------ read kernels */

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

#if X86
/* Software prefetch this far ahead, as the runtime's decode kernels do (src/kernels_x86.h). */
#define PREFETCH_FLOATS 2048
__attribute__((target("avx2"))) static float sum_avx2(const float *p, size_t n) {
    __m256 a[8];
    for (int k = 0; k < 8; k++) a[k] = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        for (int k = 0; k < 4; k++) _mm_prefetch((const char *)(p + i + PREFETCH_FLOATS + 16 * k), _MM_HINT_T0);
        for (int k = 0; k < 8; k++) a[k] = _mm256_add_ps(a[k], _mm256_load_ps(p + i + 8 * k));
    }
    for (int k = 1; k < 8; k++) a[0] = _mm256_add_ps(a[0], a[k]);
    float lanes[8];
    _mm256_storeu_ps(lanes, a[0]);
    return sum_portable(lanes, 8) + sum_portable(p + i, n - i);
}

__attribute__((target("avx512f"))) static float sum_avx512(const float *p, size_t n) {
    __m512 a[8];
    for (int k = 0; k < 8; k++) a[k] = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 128 <= n; i += 128)
        for (int k = 0; k < 8; k++) {
            _mm_prefetch((const char *)(p + i + PREFETCH_FLOATS + 16 * k), _MM_HINT_T0);
            a[k] = _mm512_add_ps(a[k], _mm512_load_ps(p + i + 16 * k));
        }
    for (int k = 1; k < 8; k++) a[0] = _mm512_add_ps(a[0], a[k]);
    return _mm512_reduce_add_ps(a[0]) + sum_portable(p + i, n - i);
}
#endif

static float sum_slice(isa v, const float *p, size_t n) {
#if X86
    if (v == ISA_AVX512) return sum_avx512(p, n);
    if (v == ISA_AVX2) return sum_avx2(p, n);
#endif
    (void)v;
    return sum_portable(p, n);
}

/* ------------------------------------------------------------------ FMA kernels */

#define CHAINS 12

static float fma_portable(long iters, float seed) {
    float acc[CHAINS * 8];
    for (int k = 0; k < CHAINS * 8; k++) acc[k] = seed + (float)k;
    for (long i = 0; i < iters; i++)
        for (int k = 0; k < CHAINS * 8; k++) acc[k] = acc[k] * 0.999999f + 1e-7f;
    float s = 0.0f;
    for (int k = 0; k < CHAINS * 8; k++) s += acc[k];
    return s;
}

#if X86
/* all CHAINS FMAs of an iteration are independent of each other; each chain's latency is hidden.
 * The loop over the chains is unrolled so that they stay in registers: at -O2 gcc kept them in
 * memory, every FMA waiting on the store before it (a Zen 5 core measured 65 GFLOP/s that way,
 * 236 unrolled). */
__attribute__((target("avx2,fma"))) static float fma_avx2(long iters, float seed) {
    __m256 acc[CHAINS];
    const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f * seed);
    for (int k = 0; k < CHAINS; k++) acc[k] = _mm256_set1_ps(seed + (float)k);
    for (long i = 0; i < iters; i++)
#pragma GCC unroll 16 /* >= CHAINS: the accumulators stay in registers */
        for (int k = 0; k < CHAINS; k++) acc[k] = _mm256_fmadd_ps(acc[k], a, b);
    for (int k = 1; k < CHAINS; k++) acc[0] = _mm256_add_ps(acc[0], acc[k]);
    float lanes[8];
    _mm256_storeu_ps(lanes, acc[0]);
    return lanes[0] + lanes[7];
}

__attribute__((target("avx512f"))) static float fma_avx512(long iters, float seed) {
    __m512 acc[CHAINS];
    const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f * seed);
    for (int k = 0; k < CHAINS; k++) acc[k] = _mm512_set1_ps(seed + (float)k);
    for (long i = 0; i < iters; i++)
#pragma GCC unroll 16 /* as in fma_avx2 */
        for (int k = 0; k < CHAINS; k++) acc[k] = _mm512_fmadd_ps(acc[k], a, b);
    for (int k = 1; k < CHAINS; k++) acc[0] = _mm512_add_ps(acc[0], acc[k]);
    return _mm512_reduce_add_ps(acc[0]);
}
#endif

/* One block of FMAs (a fraction of a millisecond) and its FLOPs; the portable loop runs 8x
 * fewer iterations of its 8x more scalar chains.  A pass is FMA_ITEMS_PER_THREAD blocks per
 * thread. */
#define FMA_ITERS (1L << 16)
#define FMA_ITEMS_PER_THREAD 8

static double fma_block_flops(isa v) {
    return v == ISA_AVX512 ? (double)FMA_ITERS * CHAINS * 16 * 2 : (double)FMA_ITERS * CHAINS * 8 * 2 / (v == ISA_PORTABLE ? 8 : 1);
}

static float fma_block(isa v) {
#if X86
    if (v == ISA_AVX512) return fma_avx512(FMA_ITERS, 1.0f);
    if (v == ISA_AVX2) return fma_avx2(FMA_ITERS, 1.0f);
#endif
    return fma_portable(FMA_ITERS / 8, 1.0f);
}

/* ------------------------------------------------------------------ the team of threads */

/* A barrier that spins (never sleeps), so every thread leaving it is on a CPU. */
typedef struct {
    atomic_int waiting, phase;
    int n;
} spin_barrier;

static void cpu_relax(void) {
#if X86
    _mm_pause();
#endif
}

static void barrier_wait(spin_barrier *b) {
    int phase = atomic_load(&b->phase);
    if (atomic_fetch_add(&b->waiting, 1) == b->n - 1) {
        atomic_store(&b->waiting, 0);
        atomic_store(&b->phase, phase + 1);
        return;
    }
    while (atomic_load(&b->phase) == phase) cpu_relax();
}

typedef enum { JOB_READ, JOB_READ_COLD, JOB_FMA } job_kind;

/* A pass is N_ITEMS items of work (a chunk of the buffer each, or one FMA block) that the
 * threads claim one at a time; once none is left unclaimed, each thread also redoes every item
 * not yet marked done (one a descheduled thread holds), so the pass is over as soon as some
 * thread has seen every item done, whatever a thread off its CPU is doing. */
#define CHUNK_FLOATS (16 << 10) /* 64 KB */
#define MAX_ITEMS 65536

typedef struct {
    job_kind kind;
    isa v;
    int n_threads;
    double ms;
    const float *buf;
    size_t n; /* floats in buf, a multiple of CHUNK_FLOATS or less than one chunk */
    const float *evict;
    size_t n_evict;
    int n_items;
    atomic_int next_item;
    atomic_char done[MAX_ITEMS];
    spin_barrier barrier;
    double start[MAX_THREADS], end[MAX_THREADS];
    double *times; /* one per pass, written by thread 0 */
    int max_passes, passes;
    atomic_int stop;
    float sink[MAX_THREADS];
} team;

typedef struct {
    team *t;
    int id;
} member;

/* The process's i-th allowed CPU, or -1. */
static int nth_cpu(int i) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return -1;
    for (int cpu = 0, seen = 0; cpu < CPU_SETSIZE; cpu++)
        if (CPU_ISSET(cpu, &set) && seen++ == i) return cpu;
    return -1;
}

static void pin_to(int cpu) {
    if (cpu < 0) return;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pthread_setaffinity_np(pthread_self(), sizeof one, &one);
}

static float do_item(team *t, int item) {
    if (t->kind == JOB_FMA) return fma_block(t->v);
    size_t lo = (size_t)item * CHUNK_FLOATS, len = t->n - lo < CHUNK_FLOATS ? t->n - lo : CHUNK_FLOATS;
    return sum_slice(t->v, t->buf + lo, len);
}

/* Claims items until none is left, then redoes those not yet done. */
static float run_items(team *t) {
    float acc = 0.0f;
    for (int item; (item = atomic_fetch_add(&t->next_item, 1)) < t->n_items;) {
        acc += do_item(t, item);
        atomic_store(&t->done[item], 1);
    }
    for (int item = 0; item < t->n_items; item++)
        if (!atomic_load(&t->done[item])) {
            acc += do_item(t, item);
            atomic_store(&t->done[item], 1);
        }
    return acc;
}

/* Each pass: (cold: every thread reads its share of the eviction buffer), barrier, the timed
 * items, barrier; then thread 0 records the pass (from the first start to the first thread
 * that saw every item done) and decides whether another follows. */
static void *member_main(void *opaque) {
    member *m = opaque;
    team *t = m->t;
    int id = m->id, nt = t->n_threads;
    size_t evict_slice = t->n_evict / (size_t)nt;
    double deadline = now() + t->ms * 1e-3;
    float acc = 0.0f;
    for (;;) {
        if (t->kind == JOB_READ_COLD) /* one float per cache line of this thread's share */
            for (size_t i = evict_slice * (size_t)id; i < evict_slice * (size_t)(id + 1); i += 16) acc += t->evict[i];
        barrier_wait(&t->barrier);
        t->start[id] = now();
        acc += run_items(t);
        t->end[id] = now();
        barrier_wait(&t->barrier);
        if (id == 0) {
            double first = t->start[0], over = t->end[0];
            for (int k = 1; k < nt; k++) {
                if (t->start[k] < first) first = t->start[k];
                if (t->end[k] < over) over = t->end[k];
            }
            t->times[t->passes++] = over - first;
            int enough = t->passes >= 3 && now() > deadline;
            atomic_store(&t->stop, enough || t->passes == t->max_passes);
            atomic_store(&t->next_item, 0);
            for (int item = 0; item < t->n_items; item++) atomic_store(&t->done[item], 0);
        }
        barrier_wait(&t->barrier);
        if (atomic_load(&t->stop)) break;
    }
    t->sink[id] = acc;
    return NULL;
}

/* A team member on its own CPU. */
static void *start_pinned(void *opaque) {
    member *m = opaque;
    pin_to(nth_cpu(m->id));
    return member_main(m);
}

/* Runs the team's passes on n_threads pinned threads (the caller is thread 0). */
static void run_team(team *t) {
    pthread_t threads[MAX_THREADS];
    member members[MAX_THREADS];
    t->barrier.n = t->n_threads;
    atomic_store(&t->barrier.waiting, 0);
    atomic_store(&t->stop, 0);
    atomic_store(&t->next_item, 0);
    for (int item = 0; item < t->n_items; item++) atomic_store(&t->done[item], 0);
    t->passes = 0;
    int started = 1;
    for (int i = 1; i < t->n_threads; i++) {
        members[i] = (member){t, i};
        if (pthread_create(&threads[i], NULL, start_pinned, &members[i]) != 0) break;
        started++;
    }
    if (started < t->n_threads) { /* cannot run the team as asked: no passes */
        fprintf(stderr, "roofline: could not start %d threads\n", t->n_threads);
        exit(1);
    }
    cpu_set_t saved;
    int have_saved = pthread_getaffinity_np(pthread_self(), sizeof saved, &saved) == 0;
    pin_to(nth_cpu(0));
    members[0] = (member){t, 0};
    member_main(&members[0]);
    for (int i = 1; i < t->n_threads; i++) pthread_join(threads[i], NULL);
    if (have_saved) pthread_setaffinity_np(pthread_self(), sizeof saved, &saved);
}

/* ------------------------------------------------------------------ measurements */

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#define MAX_PASSES 100000

typedef struct {
    double warm_gbs; /* best back-to-back pass */
    double cold_gbs; /* best pass after evicting the caches */
} read_bandwidth;

/* The L3 (last-level cache) one core uses, in bytes, 0 if unknown: the kernel's word for
 * cpu0 first, because glibc's sysconf counts every L3 of the package (on a 2-core AMD EPYC VM
 * it said 384 MiB, where cpu0 sees 32 MiB). */
static size_t l3_bytes(void) {
    FILE *f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
    unsigned long kb = 0;
    if (f) {
        if (fscanf(f, "%luK", &kb) != 1) kb = 0;
        fclose(f);
    }
    if (kb) return (size_t)kb << 10;
    long n = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return n > 0 ? (size_t)n : 0;
}

/* Floats of the eviction buffer for a buffer of n floats: four times it, twice the L3, at
 * least 64 MiB. */
static size_t evict_floats(size_t n) {
    size_t floats = 4 * n, l3 = 2 * l3_bytes() / sizeof(float), min = ((size_t)64 << 20) / sizeof(float);
    if (floats < l3) floats = l3;
    return floats < min ? min : floats;
}

static volatile float sink;

static read_bandwidth bandwidth(size_t bytes, int threads, double ms, isa v) {
    read_bandwidth out = {-1.0, -1.0};
    size_t n = bytes / sizeof(float);
    n -= n % 128; /* whole 128-float blocks (the vector loops' step) */
    if (n == 0) n = 128;
    if (n > (size_t)MAX_ITEMS * CHUNK_FLOATS) n = (size_t)MAX_ITEMS * CHUNK_FLOATS;
    size_t n_evict = evict_floats(n);
    float *buf = aligned_alloc(64, n * sizeof(float));
    float *evict = malloc(n_evict * sizeof(float));
    double *times = malloc(MAX_PASSES * sizeof(double));
    if (!buf || !evict || !times) {
        free(buf);
        free(evict);
        free(times);
        return out;
    }
    /* small exact values; the eviction buffer is written so that it owns real pages (untouched
     * pages all map the one zero page, and reading them would evict nothing) */
    for (size_t i = 0; i < n; i++) buf[i] = (float)(i & 7) * 0.125f;
    for (size_t i = 0; i < n_evict; i++) evict[i] = 1.0f;
    static team t; /* 64 KB of done flags: not on the stack */
    t = (team){.kind = JOB_READ, .v = v, .n_threads = threads, .ms = 0.0, .buf = buf, .n = n, .evict = evict,
               .n_evict = n_evict, .n_items = (int)((n + CHUNK_FLOATS - 1) / CHUNK_FLOATS), .times = times,
               .max_passes = 3};
    run_team(&t); /* warm-up: caches, TLB, page faults */
    t.ms = ms;
    t.max_passes = MAX_PASSES;
    run_team(&t);
    qsort(times, (size_t)t.passes, sizeof *times, compare_doubles);
    out.warm_gbs = (double)(n * sizeof(float)) / times[0] * 1e-9;
    t.kind = JOB_READ_COLD;
    t.max_passes = 64;
    run_team(&t);
    qsort(times, (size_t)t.passes, sizeof *times, compare_doubles);
    out.cold_gbs = (double)(n * sizeof(float)) / times[0] * 1e-9;
    for (int i = 0; i < threads; i++) sink += t.sink[i];
    free(buf);
    free(evict);
    free(times);
    return out;
}

/* Best GFLOP/s over repeated blocks for about ms, all threads running blocks together. */
static double fma_peak(int threads, double ms, isa v) {
    double *times = malloc(MAX_PASSES * sizeof(double));
    if (!times) return -1.0;
    static team t;
    t = (team){.kind = JOB_FMA, .v = v, .n_threads = threads, .ms = ms, .n_items = FMA_ITEMS_PER_THREAD * threads,
               .times = times, .max_passes = MAX_PASSES};
    run_team(&t);
    qsort(times, (size_t)t.passes, sizeof *times, compare_doubles);
    for (int i = 0; i < threads; i++) sink += t.sink[i];
    double gflops = fma_block_flops(v) * t.n_items / times[0] * 1e-9;
    free(times);
    return gflops;
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv) {
    double ms = 300.0;
    size_t sizes[16];
    int n_sizes = 0, thread_list[8], n_threads = 0, do_fma = 0;
    const char *forced = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) ms = atof(argv[++i]);
        else if (!strcmp(argv[i], "-b") && i + 1 < argc && n_sizes < 16) sizes[n_sizes++] = (size_t)atoll(argv[++i]);
        else if (!strcmp(argv[i], "-t") && i + 1 < argc && n_threads < 8) thread_list[n_threads++] = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-f")) do_fma = 1;
        else if (!strcmp(argv[i], "-i") && i + 1 < argc) forced = argv[++i];
        else {
            fprintf(stderr, "usage: roofline [-m MS] [-b BYTES]... [-t THREADS]... [-f] [-i avx512|avx2|portable]\n");
            return 1;
        }
    }
    if (!n_threads) thread_list[n_threads++] = 1;
    for (int k = 0; k < n_threads; k++)
        if (thread_list[k] < 1 || thread_list[k] > MAX_THREADS) {
            fprintf(stderr, "roofline: -t %d: threads must be in 1..%d\n", thread_list[k], MAX_THREADS);
            return 1;
        }
    isa v = detect_isa();
    if (forced) {
        isa want = !strcmp(forced, "avx512") ? ISA_AVX512 : !strcmp(forced, "avx2") ? ISA_AVX2 : ISA_PORTABLE;
        if (want > v || (want == ISA_PORTABLE && strcmp(forced, "portable"))) {
            fprintf(stderr, "roofline: -i %s: not an ISA this CPU has (it has up to %s)\n", forced, isa_names[v]);
            return 1;
        }
        v = want;
    }
    int cpus = 0;
    while (nth_cpu(cpus) >= 0) cpus++;
    printf("{\"isa\": \"%s\", \"avx2_fma\": %s, \"threads_via\": \"pthreads, pinned\", \"max_threads\": %d, "
           "\"ms\": %.0f, \"l3_bytes\": %zu,\n", isa_names[v], v != ISA_PORTABLE ? "true" : "false", cpus, ms,
           l3_bytes());
    printf(" \"bandwidth_gbs\": [");
    int first = 1;
    for (int s = 0; s < n_sizes; s++)
        for (int k = 0; k < n_threads; k++) {
            int t = thread_list[k];
            read_bandwidth bw = bandwidth(sizes[s], t, ms, v);
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
            printf("%s\n  {\"threads\": %d, \"gflops\": %.3f}", first ? "" : ",", t, fma_peak(t, ms, v));
            first = 0;
            fflush(stdout);
        }
    printf("]}\n");
    return 0;
}
