/*
 * pool.h - a small persistent thread pool (internal to arianna_c).
 *
 * A decode step issues ~30 short parallel jobs (one per fused matrix product or attention
 * pass), each a few microseconds long, so dispatch cost matters most.  A job is a number of
 * blocks that the caller and the workers claim one at a time: if a worker is slow to wake
 * (or preempted on a busy machine), the others take its blocks instead of waiting for it.
 */
#ifndef ARIANNA_POOL_H
#define ARIANNA_POOL_H

typedef struct ac_pool ac_pool;

/* Runs block `block` of n_blocks; thread (0 .. n_threads - 1, 0 = the caller of ac_pool_run)
 * says which thread runs it, for per-thread scratch memory. */
typedef void (*ac_pool_fn)(void *arg, int block, int n_blocks, int thread);

/* Most blocks one job may have. */
#define AC_POOL_MAX_BLOCKS (1 << 20)

/* Starts n_threads - 1 workers (none for n_threads == 1).  Returns NULL on failure. */
ac_pool *ac_pool_create(int n_threads);
void ac_pool_free(ac_pool *pool);
int ac_pool_threads(const ac_pool *pool);

/* Runs fn on blocks 0 .. n_blocks - 1 (1 <= n_blocks <= AC_POOL_MAX_BLOCKS), each exactly
 * once, on any of the threads, and returns when all have returned.  One caller at a time. */
void ac_pool_run(ac_pool *pool, ac_pool_fn fn, void *arg, int n_blocks);

/* The number of CPUs this process may run on (at least 1). */
int ac_available_cpus(void);

/* The [begin, end) share of block `block` among n_blocks of n items, split in whole units of
 * `align` items (only the very last unit may be shorter). */
void ac_split(int n, int align, int block, int n_blocks, int *begin, int *end);

#endif /* ARIANNA_POOL_H */
