/*
 * forward.c - the transformer forward pass and the state it works in.
 *
 * The state holds the KV caches (one per sequence), the activation buffers and the thread
 * pool.  The forward pass runs rows of tokens through the layers together: one row for
 * decode, a block of rows for prefill and one row per sequence for batched decode, with
 * rmsnorm, RoPE, attention, SwiGLU and the classifier as in llama2.c.
 *
 * Numerics: float32 with no fast-math; the matrix products (kernels.h) keep 8 or 16 partial
 * sums per dot product, so results match a NumPy/PyTorch float32 reference to ~1e-5 relative.
 * A row's result never depends on the thread count or on how many rows are computed
 * together, so prefill, stepwise and batched decode agree bitwise.
 */
#include "internal.h"

#include "kernels.h"
#include "pool.h"

#include <math.h>
#include <stdlib.h>

/* ======================================================================== state */

/* Prompt tokens run through the layers together, as matrix-matrix products (prefill). */
#define PREFILL_ROWS 64
/* Rows of one sequence at consecutive positions (a prompt block) attend together, up to
 * this many: their scores against the cached keys are one small GEMM. */
#define ATTENTION_ROWS 16

struct ac_state {
    const ac_model *model;
    const ac_kernels *kern;
    int n_seqs;         /* independent sequences, each with its own KV cache (batched decode) */
    int max_rows;       /* tokens one forward pass can take */
    int n_threads;
    ac_pool *pool;
    /* activations, one row per token of the pass */
    float *x;           /* (rows, D) the residual stream */
    float *xb, *xb2;    /* (rows, D) scratch */
    float *qkv;         /* (rows, D + 2 KV) queries, keys, values */
    float *hb, *hb2;    /* (rows, H) FFN scratch */
    int8_t *xq;         /* (rows, max(D, H)) int8 copy of a matrix product's input (int8 models) */
    float *xs;          /* its group scales */
    int *row_pos;       /* (rows) each row's position */
    int *row_seq;       /* (rows) each row's sequence */
    int *group_start;   /* (rows + 1) attention groups of rows, see attention_groups() */
    float *att;         /* (n_threads, ATTENTION_ROWS, seq_len) attention scores per thread */
    float *logits;      /* (n_seqs, V) */
    float *key_cache;   /* (n_seqs, L, n_kv_heads, seq_len, head_size), see cache_offset() */
    float *value_cache; /* the same layout */
    float *rope_cos;    /* (seq_len, head_size / 2) RoPE rotation of each position */
    float *rope_sin;
};

/* Zeroed memory for count elements of size bytes, with an overflow check, starting on a cache
 * line (freed by free_array).  Then no 64-byte vector load of an activation or cache row
 * straddles two lines: at calloc's 16-byte alignment every one of them did (the float32 GEMM
 * alone 1.1-1.6x faster aligned, bench/kernel_bench.c at 250 tokens, Xeon).  calloc
 * underneath keeps a large block zeroed lazily (a KV cache is touched only as it fills); the
 * pointer it gave sits just below the aligned one. */
#define CACHE_LINE 64
static void *alloc_array(uint64_t count, size_t size) {
    if (count == 0 || count > (SIZE_MAX - CACHE_LINE) / size) return NULL;
    char *base = calloc(1, (size_t)count * size + CACHE_LINE);
    if (!base) return NULL;
    /* base is at least 8-byte aligned, so the gap is 8 to 64 bytes: room for base */
    void **p = (void **)(((uintptr_t)base + CACHE_LINE) & ~(uintptr_t)(CACHE_LINE - 1));
    p[-1] = base;
    return p;
}

static void free_array(void *p) {
    if (p) free(((void **)p)[-1]);
}

static float *alloc_floats(uint64_t count) { return alloc_array(count, sizeof(float)); }

AC_API void ac_state_free(ac_state *s) {
    if (!s) return;
    ac_pool_free(s->pool);
    free_array(s->x);
    free_array(s->xb);
    free_array(s->xb2);
    free_array(s->qkv);
    free_array(s->hb);
    free_array(s->hb2);
    free_array(s->xq);
    free_array(s->xs);
    free_array(s->row_pos);
    free_array(s->row_seq);
    free_array(s->group_start);
    free_array(s->att);
    free_array(s->logits);
    free_array(s->key_cache);
    free_array(s->value_cache);
    free_array(s->rope_cos);
    free_array(s->rope_sin);
    free(s);
}

AC_API int ac_default_threads(void) {
    int n = ac_available_cpus();
    return n < AC_MAX_THREADS ? n : AC_MAX_THREADS;
}

AC_API const char *ac_kernel_name(void) { return ac_kernels_get()->name; }

int ac_check_thread_count(int n_threads) {
    if (n_threads < 0 || n_threads > AC_MAX_THREADS)
        return ac_fail(AC_ERR_ARG, "n_threads %d is invalid: it must be in 1..%d (0 = all available cores)",
                       n_threads, AC_MAX_THREADS);
    return AC_OK;
}

AC_API int ac_state_set_threads(ac_state *s, int n_threads) {
    if (!s) return ac_fail(AC_ERR_ARG, "ac_state_set_threads: state is NULL");
    int rc = ac_check_thread_count(n_threads);
    if (rc) return rc;
    if (n_threads == 0) n_threads = ac_default_threads();
    if (n_threads == s->n_threads) return AC_OK;
    float *att = alloc_floats((uint64_t)n_threads * ATTENTION_ROWS * (uint64_t)s->model->config.seq_len);
    ac_pool *pool = att ? ac_pool_create(n_threads) : NULL;
    if (!pool) {
        free_array(att);
        return ac_fail(AC_ERR_NOMEM, "cannot start %d threads (out of memory or thread limit)", n_threads);
    }
    ac_pool_free(s->pool);
    free_array(s->att);
    s->pool = pool;
    s->att = att;
    s->n_threads = n_threads;
    return AC_OK;
}

int ac_state_create_seqs(const ac_model *m, int n_seqs, int n_threads, ac_state **out) {
    const ac_config *c = &m->config;
    ac_state *s = calloc(1, sizeof *s);
    if (!s) return ac_fail(AC_ERR_NOMEM, "out of memory for the state");
    int head_size = c->dim / c->n_heads;
    int half = head_size / 2;
    uint64_t kv_dim = (uint64_t)head_size * (uint64_t)c->n_kv_heads;
    uint64_t D = (uint64_t)c->dim, H = (uint64_t)c->hidden_dim, S = (uint64_t)c->seq_len;
    uint64_t widest = D > H ? D : H;
    /* < 2^63 by the header bounds */
    uint64_t cache = (uint64_t)n_seqs * (uint64_t)c->n_layers * S * kv_dim;
    int rows = c->seq_len < PREFILL_ROWS ? c->seq_len : PREFILL_ROWS;
    if (rows < n_seqs) rows = n_seqs;
    s->model = m;
    s->kern = ac_kernels_get();
    s->n_seqs = n_seqs;
    s->max_rows = rows;
    s->x = alloc_floats(rows * D);
    s->xb = alloc_floats(rows * D);
    s->xb2 = alloc_floats(rows * D);
    s->qkv = alloc_floats(rows * (D + 2 * kv_dim));
    s->hb = alloc_floats(rows * H);
    s->hb2 = alloc_floats(rows * H);
    int quantized = c->group_size > 0;
    if (quantized) {
        s->xq = alloc_array(rows * widest, sizeof(int8_t));
        s->xs = alloc_floats(rows * widest / (uint64_t)c->group_size);
    }
    s->row_pos = alloc_array((uint64_t)rows, sizeof(int));
    s->row_seq = alloc_array((uint64_t)rows, sizeof(int));
    s->group_start = alloc_array((uint64_t)rows + 1, sizeof(int));
    s->logits = alloc_floats((uint64_t)n_seqs * (uint64_t)c->vocab_size);
    s->key_cache = alloc_floats(cache);
    s->value_cache = alloc_floats(cache);
    s->rope_cos = alloc_floats(S * (uint64_t)half);
    s->rope_sin = alloc_floats(S * (uint64_t)half);
    if (!s->x || !s->xb || !s->xb2 || !s->qkv || !s->hb || !s->hb2 ||
        (quantized && (!s->xq || !s->xs)) || !s->row_pos || !s->row_seq || !s->group_start || !s->logits ||
        !s->key_cache || !s->value_cache || !s->rope_cos || !s->rope_sin) {
        ac_state_free(s);
        return ac_fail(AC_ERR_NOMEM, "out of memory for the state (KV cache of %llu floats)",
                       (unsigned long long)(2 * cache));
    }
    /* angle = pos * freq_i with freq_i = 1 / 10000^(2i / head_size), in float32 like the
     * reference; tabulated once instead of two trig calls per pair per layer per token */
    for (int i = 0; i < half; i++) {
        float freq = 1.0f / powf(10000.0f, (float)(2 * i) / (float)head_size);
        for (int pos = 0; pos < c->seq_len; pos++) {
            float angle = (float)pos * freq;
            s->rope_cos[(size_t)pos * half + i] = cosf(angle);
            s->rope_sin[(size_t)pos * half + i] = sinf(angle);
        }
    }
    int rc = ac_state_set_threads(s, n_threads);
    if (rc) {
        ac_state_free(s);
        return rc;
    }
    *out = s;
    return AC_OK;
}

float *ac_state_logits(ac_state *s) { return s->logits; }

AC_API int ac_state_create(const ac_model *m, ac_state **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_state_create: out is NULL");
    *out = NULL;
    if (!m) return ac_fail(AC_ERR_ARG, "ac_state_create: model is NULL");
    return ac_state_create_seqs(m, 1, 0, out);
}

/* ======================================================================== forward */

/* Rows rmsnorm() takes together, at most.  Against one row at a time (248 persona rows, the
 * Xeon VM): 1.5-1.7x for the norm alone, int8 prefill 1.01-1.02x (bench/ab.c -c, both orders,
 * 11 rounds). */
#define NORM_ROWS 8

/* o = x * (1 / sqrt(mean(x^2) + 1e-5)) * w for rows [0, m) of x and o (rows of n floats,
 * m <= NORM_ROWS); o may alias x.  A row's sum of squares is one chain of dependent adds
 * (j = 0, 1, ... in order); the m rows' chains advance together, so the CPU overlaps their
 * latencies, and each row gets the bits it gets alone.  Inlined, so that the calls with
 * m = NORM_ROWS compile to a loop of constant width. */
static inline __attribute__((always_inline)) void rmsnorm(float *o, const float *x, const float *w, int n,
                                                          int m) {
    float ss[NORM_ROWS] = {0.0f};
    for (int j = 0; j < n; j++)
        for (int r = 0; r < m; r++) ss[r] += x[(size_t)r * n + j] * x[(size_t)r * n + j];
    for (int r = 0; r < m; r++) {
        float scale = 1.0f / sqrtf(ss[r] / (float)n + 1e-5f);
        for (int j = 0; j < n; j++) o[(size_t)r * n + j] = (x[(size_t)r * n + j] * scale) * w[j];
    }
}

/* The sampler's softmax: libm's expf on every CPU, so a given set of logits samples the same
 * tokens whatever the kernels (attention uses the kernel set's own softmax). */
float ac_softmax(float *x, int n) { return ac_softmax_scalar(x, n); }

/* Rotates the interleaved pairs (v[2i], v[2i+1]) of each of the n_heads heads of v by the
 * angle whose cosine and sine are cos_t[i], sin_t[i]. */
static void rope(float *v, int n_heads, int head_size, const float *cos_t, const float *sin_t) {
    for (int h = 0; h < n_heads; h++) {
        float *hv = v + (size_t)h * head_size;
        for (int i = 0; i < head_size / 2; i++) {
            float c = cos_t[i], s = sin_t[i];
            float a = hv[2 * i], b = hv[2 * i + 1];
            hv[2 * i] = a * c - b * s;
            hv[2 * i + 1] = a * s + b * c;
        }
    }
}

/* Runs job over n_units units of work on the state's threads, one block per thread (claimed
 * dynamically: the block of a thread that is late to wake goes to one that is free).  Measured
 * against four blocks per thread (bench/ab.c, 2 threads, both orders, 11-21 rounds, the
 * persona): decode 1.14x int8 / 1.06x float32, prefill 1.14x / 1.06x, batched decode 1.14x /
 * 1.04x; each block is a claim on the pool's shared ticket and a kernel call of its own. */
static void run_job(ac_state *s, ac_pool_fn job, void *arg, int n_units) {
    int blocks = s->n_threads;
    if (blocks > n_units) blocks = n_units;
    if (blocks > 0) ac_pool_run(s->pool, job, arg, blocks);
}

/* Matrix rows [r0, r1) times the T input rows x (T, n) into out (row t at out + t * ldo).
 * int8 matrices read the quantized copy of x that quantize_input() left in s->xq / s->xs. */
static void matmul_rows(const ac_state *s, const ac_matrix *W, float *out, int ldo,
                        const float *x, int T, int n, int r0, int r1) {
    int gs = s->model->config.group_size;
    if (W->f) s->kern->gemm_f32(out, ldo, W->f, n, x, n, T, n, r0, r1);
    else if (W->packed) s->kern->gemm_q8(out, ldo, W->packed, NULL, s->xq, s->xs, T, n, gs, r0, r1);
    else s->kern->gemm_q8(out, ldo, W->q, W->s, s->xq, s->xs, T, n, gs, r0, r1);
}

/* ---------------------------------------------------------------- work row by row
 * Between the matrix products each row needs work of its own (a residual add, an RMS norm,
 * int8 quantization of the next product's input, RoPE).  One row's arithmetic is sequential,
 * but rows are independent: several rows (prefill, batched decode) are split between the
 * threads, while a lone row (decode) runs on the caller with no synchronisation.  Either way
 * each row is computed as on one thread. */
typedef void (*rows_fn)(const ac_state *s, const void *ctx, int r0, int r1);

typedef struct {
    const ac_state *s;
    rows_fn fn;
    const void *ctx;
    int n;
} rows_job;

static void rows_task(void *arg, int block, int n_blocks, int thread) {
    (void)thread;
    const rows_job *j = arg;
    int r0, r1;
    ac_split(j->n, 1, block, n_blocks, &r0, &r1);
    if (r0 < r1) j->fn(j->s, j->ctx, r0, r1);
}

/* Rows per block, at least.  On the Xeon VM a lone row's RMS norm took ~0.35 us (a chain of
 * dependent adds; ~0.2 us a row in groups of NORM_ROWS) and its int8 quantization ~0.15 us,
 * while a job costs the pool ~0.2 us and the other thread ~0.5 us to start, so a block of one
 * or two rows would gain little or nothing.  Rows split between two threads against all of them on the caller (bench/ab.c,
 * the persona, 9-11 rounds): int8 prefill 1.06-1.08x (both orders); float32 prefill 1.01x,
 * batched decode (16 rows) 0.98-1.01x, within the noise. */
#define ROWS_PER_BLOCK 4

/* fn(s, ctx, r0, r1) over ranges that cover [0, n). */
static void for_each_row(ac_state *s, int n, rows_fn fn, const void *ctx) {
    rows_job job = {s, fn, ctx, n};
    run_job(s, rows_task, &job, (n + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK);
}

/* Rows [r0, r1) of x (rows of n floats) quantized into s->xq / s->xs. */
typedef struct {
    const float *x;
    int n;
} quantize_ctx;

static void quantize_rows(const ac_state *s, const void *ctx, int r0, int r1) {
    const quantize_ctx *q = ctx;
    int gs = s->model->config.group_size;
    size_t n = (size_t)q->n;
    for (size_t r = (size_t)r0; r < (size_t)r1; r++)
        s->kern->quantize_q8(s->xq + r * n, s->xs + r * (n / gs), q->x + r * n, q->n, gs);
}

/* For int8 models: quantizes the T rows of x (T, n) into s->xq / s->xs. */
static void quantize_input(ac_state *s, const float *x, int T, int n) {
    if (s->model->config.group_size == 0) return;
    quantize_ctx q = {x, n};
    for_each_row(s, T, quantize_rows, &q);
}

/* Rows [r0, r1) of the residual stream: x += add (when add is not NULL), then
 * out = rmsnorm(x) * w; rows of dim floats. */
typedef struct {
    float *x;
    const float *add;
    const float *w;
    float *out;
} norm_ctx;

static void norm_rows(const ac_state *s, const void *ctx, int r0, int r1) {
    const norm_ctx *c = ctx;
    size_t D = (size_t)s->model->config.dim;
    float *x = c->x + r0 * D, *out = c->out + r0 * D;
    size_t n = (size_t)(r1 - r0) * D;
    if (c->add) {
        const float *a = c->add + r0 * D;
        for (size_t i = 0; i < n; i++) x[i] += a[i];
    }
    int r = r0;
    for (; r + NORM_ROWS <= r1; r += NORM_ROWS, x += NORM_ROWS * D, out += NORM_ROWS * D)
        rmsnorm(out, x, c->w, (int)D, NORM_ROWS);
    if (r < r1) rmsnorm(out, x, c->w, (int)D, r1 - r);
}

static void add_and_norm(ac_state *s, int n, float *x, const float *add, const float *w, float *out) {
    norm_ctx c = {x, add, w, out};
    for_each_row(s, n, norm_rows, &c);
}

/* Rows are split between threads in units of this many, a multiple of every kernel set's row
 * tile (16: avx512-amx's int8 tiles and avx512-vnni's packed int8 blocks, whose part-filled
 * last one costs about a whole one). */
#define ROW_UNIT 16

/* Up to three matrices with the same input x (T, n), stacked by rows (wq, wk, wv): one
 * parallel job for all of them.  Matrix m's outputs go to columns col[m].. of out. */
typedef struct {
    const ac_state *s;
    int n_mats;
    const ac_matrix *mats[3];
    int rows[3], col[3];
    const float *x;
    int T, n;
    float *out;
    int ldo;
} matmul_job;

static int matmul_rows_total(const matmul_job *j) {
    int total = 0;
    for (int m = 0; m < j->n_mats; m++) total += j->rows[m];
    return total;
}

static void matmul_task(void *arg, int block, int n_blocks, int thread) {
    (void)thread;
    const matmul_job *j = arg;
    int begin, end;
    ac_split(matmul_rows_total(j), ROW_UNIT, block, n_blocks, &begin, &end);
    for (int m = 0, first = 0; m < j->n_mats; first += j->rows[m], m++) {
        int r0 = begin > first ? begin - first : 0;
        int r1 = end - first < j->rows[m] ? end - first : j->rows[m];
        if (r0 < r1) matmul_rows(j->s, j->mats[m], j->out + j->col[m], j->ldo, j->x, j->T, j->n, r0, r1);
    }
}

static void matmul(ac_state *s, matmul_job *job) {
    quantize_input(s, job->x, job->T, job->n);
    run_job(s, matmul_task, job, (matmul_rows_total(job) + ROW_UNIT - 1) / ROW_UNIT);
}

/* out (T, d) = W (d, n) @ x (T, n) for a single matrix. */
static void matmul1(ac_state *s, const ac_matrix *W, float *out, const float *x, int T, int n, int d) {
    matmul_job job = {s, 1, {W}, {d}, {0}, x, T, n, out, d};
    matmul(s, &job);
}

/* FFN up-projection of layer l: hb = silu(W1 @ xb) * (W3 @ xb).  Each block takes the same
 * rows of W1 and W3, so it can apply the gate to its own outputs (no second pass). */
typedef struct {
    const ac_state *s;
    const ac_layer *layer;
    int T;
} ffn_job;

static void ffn_up_task(void *arg, int block, int n_blocks, int thread) {
    (void)thread;
    const ffn_job *j = arg;
    const ac_state *s = j->s;
    int D = s->model->config.dim, H = s->model->config.hidden_dim;
    int r0, r1;
    ac_split(H, ROW_UNIT, block, n_blocks, &r0, &r1);
    if (r0 == r1) return;
    matmul_rows(s, &j->layer->w1, s->hb, H, s->xb, j->T, D, r0, r1);
    matmul_rows(s, &j->layer->w3, s->hb2, H, s->xb, j->T, D, r0, r1);
    for (int t = 0; t < j->T; t++) s->kern->swiglu(s->hb + (size_t)t * H + r0, s->hb2 + (size_t)t * H + r0, r1 - r0);
}

/* Where the cached keys (or values) of kv head kv_head of layer l of sequence seq begin: each
 * head's positions are contiguous, so attention reads one sequential stream per head. */
static size_t cache_offset(const ac_state *s, int seq, int l, int kv_head) {
    const ac_config *c = &s->model->config;
    size_t head_size = (size_t)(c->dim / c->n_heads);
    return (((size_t)seq * c->n_layers + (size_t)l) * c->n_kv_heads + (size_t)kv_head) * c->seq_len * head_size;
}

/* Causal self-attention of head h for rows [r0, r1) (one sequence, consecutive positions)
 * over positions 0..pos of the sequence's layer-l cache, into the rows of s->xb2.  scores
 * is this thread's (ATTENTION_ROWS, seq_len) scratch.  Each score is a dot product computed
 * by the same kernel sequence whatever the group, so grouping does not change results. */
static void attend(const ac_state *s, int l, int r0, int r1, int h, float *scores) {
    const ac_config *c = &s->model->config;
    int D = c->dim, head_size = D / c->n_heads;
    int kv_dim = head_size * c->n_kv_heads, qkv_width = D + 2 * kv_dim;
    int kv_mul = c->n_heads / c->n_kv_heads; /* GQA: query heads per kv head */
    int n_pos = s->row_pos[r1 - 1] + 1;      /* positions the last row sees */
    size_t off = cache_offset(s, s->row_seq[r0], l, h / kv_mul);
    const float *q = s->qkv + (size_t)r0 * qkv_width + (size_t)h * head_size;
    s->kern->gemm_f32(scores, n_pos, s->key_cache + off, head_size, q, qkv_width, r1 - r0, head_size, 0, n_pos);
    float inv_scale = sqrtf((float)head_size);
    for (int r = r0; r < r1; r++) {
        float *att = scores + (size_t)(r - r0) * n_pos;
        int pos = s->row_pos[r];
        for (int t = 0; t <= pos; t++) att[t] /= inv_scale;
        s->kern->softmax(att, pos + 1);
    }
    /* the rows' positions are consecutive: row r0 + i weighs positions 0 .. row_pos[r0] + i */
    s->kern->weighted_sum(s->xb2 + (size_t)r0 * D + (size_t)h * head_size, D, scores, n_pos, s->value_cache + off,
                          head_size, s->row_pos[r0] + 1, r1 - r0, head_size);
}

/* Row r's queries of heads [h0, h1) and keys of kv heads [k0, k1) rotated by its position, and
 * those keys and values written to its sequence's layer-l cache. */
static void rotate_and_cache(const ac_state *s, int l, int r, int h0, int h1, int k0, int k1) {
    const ac_config *c = &s->model->config;
    int D = c->dim, head_size = D / c->n_heads, kv_dim = head_size * c->n_kv_heads;
    float *q = s->qkv + (size_t)r * (D + 2 * kv_dim), *k = q + D, *v = k + kv_dim;
    size_t rot = (size_t)s->row_pos[r] * (head_size / 2);
    rope(q + (size_t)h0 * head_size, h1 - h0, head_size, s->rope_cos + rot, s->rope_sin + rot);
    rope(k + (size_t)k0 * head_size, k1 - k0, head_size, s->rope_cos + rot, s->rope_sin + rot);
    for (int kh = k0; kh < k1; kh++) {
        size_t row = cache_offset(s, s->row_seq[r], l, kh) + (size_t)s->row_pos[r] * head_size;
        memcpy(s->key_cache + row, k + (size_t)kh * head_size, (size_t)head_size * sizeof(float));
        memcpy(s->value_cache + row, v + (size_t)kh * head_size, (size_t)head_size * sizeof(float));
    }
}

/* Rows [r0, r1): queries and keys of every head rotated and cached, in layer *(const int *)ctx. */
static void rotate_rows(const ac_state *s, const void *ctx, int r0, int r1) {
    const ac_config *c = &s->model->config;
    for (int r = r0; r < r1; r++) rotate_and_cache(s, *(const int *)ctx, r, 0, c->n_heads, 0, c->n_kv_heads);
}

/* Splits rows [0, n) into attention groups: runs of one sequence at consecutive positions,
 * at most ATTENTION_ROWS long.  Returns the count; group g is [start[g], start[g + 1]). */
static int attention_groups(const ac_state *s, int n, int *start) {
    int groups = 0;
    for (int r = 0; r < n; r++)
        if (r == 0 || r - start[groups - 1] == ATTENTION_ROWS || s->row_seq[r] != s->row_seq[r - 1] ||
            s->row_pos[r] != s->row_pos[r - 1] + 1)
            start[groups++] = r;
    start[groups] = n;
    return groups;
}

typedef struct {
    const ac_state *s;
    const ac_layer *layer;
    int l, n_rows, n_groups;
} attention_job;

/* Blocks of (group, head) pairs. */
static void attention_task(void *arg, int block, int n_blocks, int thread) {
    const attention_job *j = arg;
    const ac_state *s = j->s;
    int n_heads = s->model->config.n_heads;
    float *scores = s->att + (size_t)thread * ATTENTION_ROWS * s->model->config.seq_len;
    int begin, end;
    ac_split(j->n_groups * n_heads, 1, block, n_blocks, &begin, &end);
    for (int item = begin; item < end; item++) {
        int g = item / n_heads;
        attend(s, j->l, s->group_start[g], s->group_start[g + 1], item % n_heads, scores);
    }
}

/* Queries, keys and values of a share of the kv heads (each with its query heads) for every
 * row, rotated and cached, then those heads' attention: one job instead of a matrix product
 * and an attention pass with a wait between them, for thread counts that divide the kv heads
 * (every block the same work).  Each number is computed as in the two-job path. */
static void qkv_attention_task(void *arg, int block, int n_blocks, int thread) {
    const attention_job *j = arg;
    const ac_state *s = j->s;
    const ac_config *c = &s->model->config;
    int D = c->dim, head_size = D / c->n_heads, kv_dim = head_size * c->n_kv_heads;
    int kv_mul = c->n_heads / c->n_kv_heads, qkv_width = D + 2 * kv_dim, n = j->n_rows;
    int k0, k1;
    ac_split(c->n_kv_heads, 1, block, n_blocks, &k0, &k1);
    if (k0 == k1) return;
    int h0 = k0 * kv_mul, h1 = k1 * kv_mul;
    matmul_rows(s, &j->layer->wq, s->qkv, qkv_width, s->xb, n, D, h0 * head_size, h1 * head_size);
    matmul_rows(s, &j->layer->wk, s->qkv + D, qkv_width, s->xb, n, D, k0 * head_size, k1 * head_size);
    matmul_rows(s, &j->layer->wv, s->qkv + D + kv_dim, qkv_width, s->xb, n, D, k0 * head_size, k1 * head_size);
    for (int r = 0; r < n; r++) rotate_and_cache(s, j->l, r, h0, h1, k0, k1);
    float *scores = s->att + (size_t)thread * ATTENTION_ROWS * c->seq_len;
    for (int g = 0; g < j->n_groups; g++)
        for (int h = h0; h < h1; h++) attend(s, j->l, s->group_start[g], s->group_start[g + 1], h, scores);
}

/* Row x (D) = the embedding of token (dequantized for int8 models). */
static void embed(const ac_state *s, int token, float *x) {
    const ac_config *c = &s->model->config;
    const ac_matrix *e = &s->model->w.token_embedding;
    size_t D = (size_t)c->dim;
    if (e->f) memcpy(x, e->f + (size_t)token * D, D * sizeof(float));
    else ac_dequantize_q8(x, e->q + (size_t)token * D, e->s + (size_t)token * D / c->group_size,
                          c->dim, c->group_size);
}

/* Logits rows [first, n) of a pass, at out, must be numbers: finite weights can still
 * overflow float32 somewhere in the layers (then the residual stream, and every logit after
 * it, is NaN or infinite), and a token sampled from those would be arbitrary. */
static int check_logits(const ac_state *s, const float *out, int first, int n) {
    size_t V = (size_t)s->model->config.vocab_size;
    for (int r = first; r < n; r++) {
        const float *row = out + (size_t)(r - first) * V;
        size_t i = first_non_finite(row, V);
        if (i < V)
            return ac_fail(AC_ERR_NUMERIC, "the logits after the token at position %d are not numbers "
                           "(logit %zu is %g): the model's values overflow float32", s->row_pos[r], i,
                           shown_value(row[i]));
    }
    return AC_OK;
}

/* The transformer over rows [0, n) (n <= max_rows): row r is token tokens[r] at position
 * s->row_pos[r] of sequence s->row_seq[r], and its keys/values go into that sequence's
 * cache.  Rows of one sequence must be consecutive positions in increasing order (a prompt
 * block): every row's keys/values are cached before any row attends, so each row sees the
 * earlier ones.  Logits of rows [first, n) go to out, row r at out + (r - first) * V;
 * AC_ERR_NUMERIC if one is not a number. */
static int forward_rows(ac_state *s, const int *tokens, int n, int first, float *out) {
    const ac_config *c = &s->model->config;
    const ac_weights *w = &s->model->w;
    int D = c->dim, H = c->hidden_dim, head_size = D / c->n_heads;
    int kv_dim = head_size * c->n_kv_heads, qkv_width = D + 2 * kv_dim;
    for (int r = 0; r < n; r++) embed(s, tokens[r], s->x + (size_t)r * D);
    int n_groups = attention_groups(s, n, s->group_start);
    for (int l = 0; l < c->n_layers; l++) {
        const ac_layer *layer = &w->layers[l];
        /* the previous layer's FFN output (in xb) joins the residual stream first */
        add_and_norm(s, n, s->x, l > 0 ? s->xb : NULL, w->rms_att + (size_t)l * D, s->xb);
        attention_job att = {s, layer, l, n, n_groups};
        if (s->n_threads > 1 && c->n_kv_heads % s->n_threads == 0) {
            quantize_input(s, s->xb, n, D);
            run_job(s, qkv_attention_task, &att, c->n_kv_heads);
        } else {
            matmul_job qkv = {s, 3, {&layer->wq, &layer->wk, &layer->wv}, {D, kv_dim, kv_dim},
                              {0, D, D + kv_dim}, s->xb, n, D, s->qkv, qkv_width};
            matmul(s, &qkv);
            for_each_row(s, n, rotate_rows, &l);
            run_job(s, attention_task, &att, n_groups * c->n_heads);
        }
        matmul1(s, &layer->wo, s->xb, s->xb2, n, D, D);
        add_and_norm(s, n, s->x, s->xb, w->rms_ffn + (size_t)l * D, s->xb);
        quantize_input(s, s->xb, n, D);
        ffn_job ffn = {s, layer, n};
        run_job(s, ffn_up_task, &ffn, (H + ROW_UNIT - 1) / ROW_UNIT);
        matmul1(s, &layer->w2, s->xb, s->hb, n, H, D);
    }
    if (first >= n) return AC_OK;
    /* the last FFN output joins the rows that give logits, normalized in place */
    float *xf = s->x + (size_t)first * D;
    add_and_norm(s, n - first, xf, s->xb + (size_t)first * D, w->rms_final, xf);
    matmul1(s, &w->wcls, out, xf, n - first, D, c->vocab_size);
    return check_logits(s, out, first, n);
}

/* One token of sequence seq at pos; its logits go to out (V floats). */
static int forward_one(ac_state *s, int seq, int token, int pos, float *out) {
    s->row_pos[0] = pos;
    s->row_seq[0] = seq;
    return forward_rows(s, &token, 1, 0, out);
}

/* Prefill in blocks of max_rows tokens (a block is one pass of matrix-matrix products). */
int ac_prefill(ac_state *s, int seq, const int *tokens, int n, int pos0, float *out, int all_logits) {
    size_t V = (size_t)s->model->config.vocab_size;
    int rc = AC_OK;
    for (int b = 0; b < n && !rc; b += s->max_rows) {
        int m = n - b < s->max_rows ? n - b : s->max_rows;
        for (int r = 0; r < m; r++) {
            s->row_pos[r] = pos0 + b + r;
            s->row_seq[r] = seq;
        }
        if (all_logits) rc = forward_rows(s, tokens + b, m, 0, out + (size_t)b * V);
        else rc = forward_rows(s, tokens + b, m, b + m == n ? m - 1 : m, out);
    }
    return rc;
}

/* A decode step: one row per sequence, all rows in one pass (each weight read serves all). */
int ac_forward_step(ac_state *s, const int *seqs, const int *tokens, const int *positions, int n) {
    for (int r = 0; r < n; r++) {
        s->row_seq[r] = seqs[r];
        s->row_pos[r] = positions[r];
    }
    return forward_rows(s, tokens, n, 0, s->logits);
}

AC_API int ac_forward(ac_state *s, int token, int pos, const float **logits) {
    if (!s) return ac_fail(AC_ERR_ARG, "ac_forward: state is NULL");
    const ac_config *c = &s->model->config;
    if (token < 0 || token >= c->vocab_size)
        return ac_fail(AC_ERR_RANGE, "token %d is outside the vocabulary [0, %d)", token, c->vocab_size);
    if (pos < 0 || pos >= c->seq_len)
        return ac_fail(AC_ERR_RANGE, "position %d is outside the context [0, %d)", pos, c->seq_len);
    int rc = forward_one(s, 0, token, pos, s->logits);
    if (!rc && logits) *logits = s->logits;
    return rc;
}

int ac_check_tokens(const int *tokens, int n, int vocab_size) {
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= vocab_size)
            return ac_fail(AC_ERR_RANGE, "token %d (at index %d) is outside the vocabulary [0, %d)",
                           tokens[i], i, vocab_size);
    return AC_OK;
}

/* The argument checks of ac_logits and ac_logits_stepwise. */
static int check_logits_args(const ac_state *s, const int *tokens, int n_tokens, const float *out,
                             const char *fn) {
    if (!s) return ac_fail(AC_ERR_ARG, "%s: state is NULL", fn);
    if (n_tokens < 0 || (n_tokens > 0 && (!tokens || !out)))
        return ac_fail(AC_ERR_ARG, "%s: bad arguments (n_tokens=%d)", fn, n_tokens);
    const ac_config *c = &s->model->config;
    if (n_tokens > c->seq_len)
        return ac_fail(AC_ERR_RANGE, "%d tokens exceed the model's seq_len %d", n_tokens, c->seq_len);
    return ac_check_tokens(tokens, n_tokens, c->vocab_size);
}

AC_API int ac_logits(ac_state *s, const int *tokens, int n_tokens, float *out) {
    int rc = check_logits_args(s, tokens, n_tokens, out, "ac_logits");
    if (rc) return rc;
    return ac_prefill(s, 0, tokens, n_tokens, 0, out, 1);
}

AC_API int ac_logits_stepwise(ac_state *s, const int *tokens, int n_tokens, float *out) {
    int rc = check_logits_args(s, tokens, n_tokens, out, "ac_logits_stepwise");
    if (rc) return rc;
    size_t V = (size_t)s->model->config.vocab_size;
    for (int t = 0; t < n_tokens; t++)
        if ((rc = forward_one(s, 0, tokens[t], t, out + (size_t)t * V))) return rc;
    return AC_OK;
}

