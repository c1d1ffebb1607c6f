/*
 * pool.c - the persistent thread pool of pool.h.
 *
 * One 64-bit atomic `ticket` describes the current job: its generation (24 bits), its
 * block count (20 bits) and the next unclaimed block (20 bits).  ac_pool_run stores the job
 * (fn, arg) and then a new ticket; every thread claims blocks by compare-and-swap on the
 * ticket, which fails once the generation moved on, so a worker that wakes late can never
 * run a block of a finished job.  A claimed block keeps its job alive: the caller returns
 * only when `done` counts every block, and only then may the next job overwrite (fn, arg).
 *
 * Idle workers poll the ticket: pause-spinning for SPIN_NS, then yielding the CPU between
 * polls (cheap when the machine is idle, polite when it is busy) until SLEEP_NS, then
 * sleeping on a condition variable.  A worker counts itself in `sleepers` before its final
 * check under the mutex and the caller reads `sleepers` after storing the ticket (both
 * sequentially consistent), so a wake-up is never lost and the common case costs no syscall.
 */
#define _GNU_SOURCE
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define SPIN_NS 50000L    /* 50 us: the gaps between the jobs of one token are shorter */
#define SLEEP_NS 2000000L /* 2 ms: the gaps between tokens of a generation are shorter */

#define BLOCK_BITS 20
#define BLOCK_MASK ((1u << BLOCK_BITS) - 1)
#define GEN_SHIFT (2 * BLOCK_BITS)

static uint64_t make_ticket(uint64_t gen, uint64_t n_blocks, uint64_t next) {
    return (gen << GEN_SHIFT) | (n_blocks << BLOCK_BITS) | next;
}
static uint64_t ticket_gen(uint64_t t) { return t >> GEN_SHIFT; }
static int ticket_blocks(uint64_t t) { return (int)((t >> BLOCK_BITS) & BLOCK_MASK); }
static int ticket_next(uint64_t t) { return (int)(t & BLOCK_MASK); }

typedef struct {
    ac_pool *pool;
    int id;
} worker_arg;

struct ac_pool {
    int n_threads;
    pthread_t *threads;
    worker_arg *args;
    ac_pool_fn fn;
    void *arg;
    _Atomic uint64_t ticket;
    atomic_int done;
    atomic_int sleepers;
    atomic_int stop;
    pthread_mutex_t mutex;
    pthread_cond_t wake;
};

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Claims and runs blocks of generation gen until none is left. */
static void run_blocks(ac_pool *p, uint64_t gen, int thread) {
    uint64_t t = atomic_load_explicit(&p->ticket, memory_order_acquire);
    for (;;) {
        if (ticket_gen(t) != gen || ticket_next(t) >= ticket_blocks(t)) return;
        if (!atomic_compare_exchange_weak_explicit(&p->ticket, &t, t + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue; /* t now holds the current ticket */
        /* the claimed block keeps (fn, arg) of this generation in place until done counts it */
        p->fn(p->arg, ticket_next(t), ticket_blocks(t), thread);
        atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
        t = atomic_load_explicit(&p->ticket, memory_order_acquire);
    }
}

/* Waits until the ticket's generation differs from seen; returns the new generation. */
static uint64_t wait_job(ac_pool *p, uint64_t seen) {
    long long start = 0;
    for (unsigned polls = 0;; polls++) {
        uint64_t gen = ticket_gen(atomic_load_explicit(&p->ticket, memory_order_acquire));
        if (gen != seen) return gen;
        if ((polls & 63) != 63) {
            cpu_relax();
            continue;
        }
        long long t = now_ns();
        if (start == 0) start = t;
        if (t - start < SPIN_NS) continue;
        if (t - start < SLEEP_NS) {
            sched_yield();
            continue;
        }
        atomic_fetch_add(&p->sleepers, 1);
        pthread_mutex_lock(&p->mutex);
        while ((gen = ticket_gen(atomic_load(&p->ticket))) == seen) pthread_cond_wait(&p->wake, &p->mutex);
        pthread_mutex_unlock(&p->mutex);
        atomic_fetch_sub(&p->sleepers, 1);
        return gen;
    }
}

static void *worker_main(void *opaque) {
    worker_arg *w = opaque;
    ac_pool *p = w->pool;
    uint64_t seen = 0;
    for (;;) {
        seen = wait_job(p, seen);
        if (atomic_load(&p->stop)) return NULL;
        run_blocks(p, seen, w->id);
    }
}

static void wake_sleepers(ac_pool *p, int always) {
    if (!always && atomic_load(&p->sleepers) == 0) return;
    pthread_mutex_lock(&p->mutex);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mutex);
}

ac_pool *ac_pool_create(int n_threads) {
    if (n_threads < 1) return NULL;
    ac_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n_threads = 1; /* raised as workers start, so free joins exactly those */
    pthread_mutex_init(&p->mutex, NULL);
    pthread_cond_init(&p->wake, NULL);
    p->threads = calloc((size_t)n_threads, sizeof *p->threads);
    p->args = calloc((size_t)n_threads, sizeof *p->args);
    if (!p->threads || !p->args) {
        ac_pool_free(p);
        return NULL;
    }
    for (int i = 1; i < n_threads; i++) {
        p->args[i] = (worker_arg){p, i};
        if (pthread_create(&p->threads[i], NULL, worker_main, &p->args[i]) != 0) {
            ac_pool_free(p);
            return NULL;
        }
        p->n_threads = i + 1;
    }
    return p;
}

void ac_pool_free(ac_pool *p) {
    if (!p) return;
    atomic_store(&p->stop, 1);
    uint64_t gen = ticket_gen(atomic_load(&p->ticket)) + 1;
    atomic_store(&p->ticket, make_ticket(gen, 0, 0));
    wake_sleepers(p, 1);
    for (int i = 1; i < p->n_threads; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mutex);
    pthread_cond_destroy(&p->wake);
    free(p->threads);
    free(p->args);
    free(p);
}

int ac_pool_threads(const ac_pool *p) { return p->n_threads; }

void ac_pool_run(ac_pool *p, ac_pool_fn fn, void *arg, int n_blocks) {
    if (p->n_threads == 1 || n_blocks == 1) {
        for (int b = 0; b < n_blocks; b++) fn(arg, b, n_blocks, 0);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    uint64_t gen = (ticket_gen(atomic_load(&p->ticket)) + 1) & ((1u << (64 - GEN_SHIFT)) - 1);
    atomic_store(&p->ticket, make_ticket(gen, (uint64_t)n_blocks, 0));
    wake_sleepers(p, 0);
    run_blocks(p, gen, 0);
    /* Only blocks other threads claimed are left: wait for them (yield if it takes long,
     * e.g. a worker was preempted in its block on a busy machine). */
    for (unsigned polls = 0; atomic_load_explicit(&p->done, memory_order_acquire) < n_blocks; polls++) {
        if (polls < 4096) cpu_relax();
        else sched_yield();
    }
}

int ac_available_cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

void ac_split(int n, int align, int block, int n_blocks, int *begin, int *end) {
    int units = (n + align - 1) / align;
    int u0 = (int)((long long)units * block / n_blocks);
    int u1 = (int)((long long)units * (block + 1) / n_blocks);
    *begin = u0 * align < n ? u0 * align : n;
    *end = u1 * align < n ? u1 * align : n;
}
