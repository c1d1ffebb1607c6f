/*
 * run.c - arianna_c's inference runtime: model loading, the forward pass, the tokenizer, the
 * sampler and generation.  See run.h for the API contract.
 *
 * Sections, in order:
 *   errors       thread-local error messages, checked size arithmetic
 *   config       parsing and validating the model header (v0 / v1 / v2 int8 layouts)
 *   weights      locating each weight array inside the mapped file
 *   model        load from a path (mmap) or from a caller's buffer
 *   quantize     int8 (v2) image of a float32 model, saving a model
 *   state        KV caches, activation buffers, thread pool
 *   forward      rmsnorm, RoPE, attention, SwiGLU, classifier over rows of tokens: one row
 *                for decode, a block of rows for prefill and for batched decode
 *   tokenizer    loading, SentencePiece-exact BPE encode, piece decode
 *   sampler      greedy / temperature / top-k / top-p with a seeded xorshift64*
 *   session      feed / next step API and the generate loop
 *
 * Numerics: float32 with no fast-math; the matrix products (kernels.c) keep 8 partial sums
 * per dot product, so results match a NumPy/PyTorch float32 reference to ~1e-5 relative.
 * A row's result never depends on the thread count or on how many rows are computed
 * together, so prefill, stepwise and batched decode agree bitwise.
 */
#define _GNU_SOURCE
#include "run.h"

#include "kernels.h"
#include "pool.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "arianna_c reads little-endian files directly and needs a little-endian host"
#endif

#define AC_VERSION "0.1.0"

/* ======================================================================== errors */

/* One message buffer per thread: no global mutable state shared between threads. */
static _Thread_local char g_error[1024];

/* Records a formatted message for this thread and returns code, so callers can write
 * `return fail(AC_ERR_ARG, "...")`. */
static int fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
    return code;
}

/* Adds text to this thread's message after a fail(), e.g. a hint shared by several errors. */
static void append_error(const char *text) {
    size_t used = strlen(g_error);
    snprintf(g_error + used, sizeof g_error - used, "%s", text);
}

AC_API const char *ac_last_error(void) { return g_error; }

AC_API const char *ac_strerror(int code) {
    switch (code) {
    case AC_OK: return "AC_OK";
    case AC_ERR_IO: return "AC_ERR_IO";
    case AC_ERR_FORMAT: return "AC_ERR_FORMAT";
    case AC_ERR_MISMATCH: return "AC_ERR_MISMATCH";
    case AC_ERR_ARG: return "AC_ERR_ARG";
    case AC_ERR_NOMEM: return "AC_ERR_NOMEM";
    case AC_ERR_RANGE: return "AC_ERR_RANGE";
    default: return "AC_ERR_UNKNOWN";
    }
}

AC_API const char *ac_version(void) { return AC_VERSION; }

/* Checked 64-bit arithmetic: sizes come from untrusted headers, so every product and sum is
 * checked even though the header bounds make overflow impossible today. */
static int mul_ok(uint64_t a, uint64_t b, uint64_t *out) { return !__builtin_mul_overflow(a, b, out); }
static int add_ok(uint64_t a, uint64_t b, uint64_t *out) { return !__builtin_add_overflow(a, b, out); }

static int32_t read_i32(const unsigned char *p) {
    int32_t v;
    memcpy(&v, p, sizeof v); /* memcpy: the bytes may be unaligned */
    return v;
}

static float read_f32(const unsigned char *p) {
    float v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* ======================================================================== config */

#define MAGIC_V1 0x616b3432u /* "ak42" read as a little-endian uint32 (v1 and v2) */
#define V0_HEADER_BYTES 28   /* seven int32 */
#define V1_HEADER_BYTES 256

/* Decodes the header at data into *c and the header size into *header_bytes.  Checks only
 * what is needed to read it; validate_config() checks the values. */
static int parse_header(const unsigned char *data, size_t size, const char *name, ac_config *c,
                        size_t *header_bytes) {
    if (size < V0_HEADER_BYTES)
        return fail(AC_ERR_FORMAT, "%s: file is %zu bytes, shorter than a model header (%d bytes)",
                    name, size, V0_HEADER_BYTES);
    uint32_t magic;
    memcpy(&magic, data, sizeof magic);
    const unsigned char *params;
    if (magic == MAGIC_V1) {
        if (size < V1_HEADER_BYTES)
            return fail(AC_ERR_FORMAT, "%s: file is %zu bytes, shorter than a v1 header (%d bytes)",
                        name, size, V1_HEADER_BYTES);
        int32_t version = read_i32(data + 4);
        if (version != 1 && version != 2)
            return fail(AC_ERR_FORMAT, "%s: unknown model file version %d (known: 1, 2)", name, version);
        unsigned char shared = data[36];
        if (shared > 1)
            return fail(AC_ERR_FORMAT, "%s: header field shared_classifier is %d, expected 0 or 1",
                        name, shared);
        params = data + 8;
        c->version = version;
        c->shared_classifier = shared;
        c->group_size = version == 2 ? read_i32(data + 37) : 0; /* int8 group size (v2) */
        *header_bytes = V1_HEADER_BYTES;
    } else {
        params = data;
        c->version = 0;
        c->shared_classifier = 1;
        c->group_size = 0;
        *header_bytes = V0_HEADER_BYTES;
    }
    c->dim = read_i32(params + 0);
    c->hidden_dim = read_i32(params + 4);
    c->n_layers = read_i32(params + 8);
    c->n_heads = read_i32(params + 12);
    c->n_kv_heads = read_i32(params + 16);
    int32_t vocab = read_i32(params + 20);
    c->seq_len = read_i32(params + 24);
    if (c->version == 0 && vocab < 0) {
        /* legacy convention: a negative vocab_size marks a separate classifier */
        if (vocab == INT32_MIN)
            return fail(AC_ERR_FORMAT, "%s: header field vocab_size is %d, out of range", name, vocab);
        vocab = -vocab;
        c->shared_classifier = 0;
    }
    c->vocab_size = vocab;
    return AC_OK;
}

static int check_field(const char *name, const char *field, int value, int min, int max) {
    if (value <= 0)
        return fail(AC_ERR_FORMAT, "%s: header field %s is %d, must be positive", name, field, value);
    if (value < min)
        return fail(AC_ERR_FORMAT, "%s: header field %s is %d, below the minimum %d", name, field,
                    value, min);
    if (value > max)
        return fail(AC_ERR_FORMAT, "%s: header field %s is %d, above the limit %d", name, field,
                    value, max);
    return AC_OK;
}

/* int8 groups run along matrix rows (dim or hidden_dim values long) and must tile them; a
 * multiple of 4 keeps every tensor's float scales 4-byte aligned in the file. */
static int validate_group_size(const ac_config *c, const char *name) {
    int gs = c->group_size;
    if (gs <= 0 || gs % 4)
        return fail(AC_ERR_FORMAT, "%s: header field group_size is %d, must be a positive multiple of 4",
                    name, gs);
    if (c->dim % gs)
        return fail(AC_ERR_FORMAT, "%s: group_size %d does not divide dim %d", name, gs, c->dim);
    if (c->hidden_dim % gs)
        return fail(AC_ERR_FORMAT, "%s: group_size %d does not divide hidden_dim %d", name, gs,
                    c->hidden_dim);
    return AC_OK;
}

static int validate_config(const ac_config *c, const char *name) {
    int rc;
    if ((rc = check_field(name, "dim", c->dim, 1, AC_MAX_DIM)) ||
        (rc = check_field(name, "hidden_dim", c->hidden_dim, 1, AC_MAX_HIDDEN_DIM)) ||
        (rc = check_field(name, "n_layers", c->n_layers, 1, AC_MAX_LAYERS)) ||
        (rc = check_field(name, "n_heads", c->n_heads, 1, c->dim)) ||
        (rc = check_field(name, "n_kv_heads", c->n_kv_heads, 1, c->n_heads)) ||
        (rc = check_field(name, "vocab_size", c->vocab_size, AC_MIN_VOCAB, AC_MAX_VOCAB)) ||
        (rc = check_field(name, "seq_len", c->seq_len, 1, AC_MAX_SEQ_LEN)))
        return rc;
    if (c->dim % c->n_heads)
        return fail(AC_ERR_FORMAT, "%s: dim %d is not divisible by n_heads %d", name, c->dim, c->n_heads);
    if (c->n_heads % c->n_kv_heads)
        return fail(AC_ERR_FORMAT, "%s: n_heads %d is not divisible by n_kv_heads %d", name,
                    c->n_heads, c->n_kv_heads);
    if ((c->dim / c->n_heads) % 2)
        return fail(AC_ERR_FORMAT, "%s: head size %d (dim / n_heads) is odd; RoPE needs pairs", name,
                    c->dim / c->n_heads);
    if (c->version == 2) return validate_group_size(c, name);
    return AC_OK;
}

/* Float counts of each weight array, in 64-bit. */
typedef struct {
    uint64_t emb, norm_l, wq, wkv, wo, ffn, norm_final, rope, wcls;
} weight_counts;

static int count_weights(const ac_config *c, weight_counts *n) {
    uint64_t D = (uint64_t)c->dim, H = (uint64_t)c->hidden_dim, L = (uint64_t)c->n_layers;
    uint64_t V = (uint64_t)c->vocab_size, S = (uint64_t)c->seq_len;
    uint64_t hs = D / (uint64_t)c->n_heads, kv_dim = hs * (uint64_t)c->n_kv_heads, t;
    int ok = mul_ok(V, D, &n->emb) && mul_ok(L, D, &n->norm_l) && mul_ok(D, D, &t) &&
             mul_ok(L, t, &n->wq) && mul_ok(kv_dim, D, &t) && mul_ok(L, t, &n->wkv) &&
             mul_ok(H, D, &t) && mul_ok(L, t, &n->ffn) && mul_ok(S, hs, &n->rope);
    n->wo = n->wq;
    n->norm_final = D;
    n->wcls = c->shared_classifier ? 0 : n->emb;
    if (c->version != 0) n->rope = 0; /* only legacy files carry RoPE tables (seq_len x hs/2, x2) */
    return ok;
}

/* Bytes of n weights: float32, or (group_size > 0) int8 plus a float scale per group. */
static int tensor_bytes(uint64_t n, int group_size, uint64_t *bytes) {
    if (group_size == 0) return mul_ok(n, 4, bytes);
    return add_ok(n, n / (uint64_t)group_size * 4, bytes);
}

/* Bytes the whole file must have for this header, or 0 on overflow.  Norms (and legacy
 * RoPE tables) are always float32; the matrices are int8 in v2. */
static uint64_t expected_file_bytes(const ac_config *c, size_t header_bytes) {
    weight_counts n = {0};
    if (!count_weights(c, &n)) return 0;
    uint64_t floats[] = {n.norm_l, n.norm_l, n.norm_final, n.rope};
    uint64_t matrices[] = {n.emb, n.wq, n.wkv, n.wkv, n.wo, n.ffn, n.ffn, n.ffn, n.wcls};
    uint64_t total = header_bytes, b;
    for (size_t i = 0; i < sizeof floats / sizeof floats[0]; i++)
        if (!tensor_bytes(floats[i], 0, &b) || !add_ok(total, b, &total)) return 0;
    for (size_t i = 0; i < sizeof matrices / sizeof matrices[0]; i++)
        if (!tensor_bytes(matrices[i], c->group_size, &b) || !add_ok(total, b, &total)) return 0;
    return total;
}

/* ======================================================================== weights */

/* One layer's weight matrix, (out, in) row-major: float32, or (v2) int8 values with one
 * float scale per group of group_size values along each row. */
typedef struct {
    const float *f;  /* float32 weights, or NULL for int8 */
    const int8_t *q; /* int8 weights */
    const float *s;  /* (out, in / group_size) scales of q */
} ac_matrix;

typedef struct {
    ac_matrix wq, wk, wv, wo, w1, w2, w3;
} ac_layer;

typedef struct {
    ac_matrix token_embedding; /* (V, D) */
    const float *rms_att;      /* (L, D) */
    const float *rms_ffn;      /* (L, D) */
    const float *rms_final;    /* (D) */
    ac_layer *layers;          /* (L) */
    ac_matrix wcls;            /* (V, D): token_embedding when shared */
} ac_weights;

/* The per-layer matrices in file order (each stored for all layers before the next), with
 * their shapes: 'D' = dim, 'H' = hidden_dim, 'K' = kv_dim. */
#define N_LAYER_MATRICES 7
static const struct {
    size_t offset;
    char rows, cols;
} LAYER_MATRICES[N_LAYER_MATRICES] = {
    {offsetof(ac_layer, wq), 'D', 'D'}, {offsetof(ac_layer, wk), 'K', 'D'},
    {offsetof(ac_layer, wv), 'K', 'D'}, {offsetof(ac_layer, wo), 'D', 'D'},
    {offsetof(ac_layer, w1), 'H', 'D'}, {offsetof(ac_layer, w2), 'D', 'H'},
    {offsetof(ac_layer, w3), 'H', 'D'},
};

static int dim_of(const ac_config *c, char which) {
    if (which == 'D') return c->dim;
    if (which == 'H') return c->hidden_dim;
    return c->dim / c->n_heads * c->n_kv_heads;
}

static ac_matrix *layer_matrix(const ac_layer *layer, int i) {
    return (ac_matrix *)((const char *)layer + LAYER_MATRICES[i].offset);
}

/* Reads the arrays after the header in file order. */
typedef struct {
    const unsigned char *p;
    int group_size; /* 0: matrices are float32 */
} cursor;

static const float *take_floats(cursor *cur, uint64_t n) {
    const float *f = (const float *)cur->p;
    cur->p += n * sizeof(float);
    return f;
}

static ac_matrix take_matrix(cursor *cur, int rows, int cols) {
    uint64_t n = (uint64_t)rows * (uint64_t)cols;
    ac_matrix m = {NULL, NULL, NULL};
    if (!cur->group_size) {
        m.f = take_floats(cur, n);
        return m;
    }
    m.q = (const int8_t *)cur->p;
    cur->p += n;
    m.s = take_floats(cur, n / (uint64_t)cur->group_size);
    return m;
}

/* Takes per-layer matrices i0..i1-1 of the LAYER_MATRICES order. */
static void take_layer_matrices(cursor *cur, ac_weights *w, const ac_config *c, int i0, int i1) {
    for (int i = i0; i < i1; i++)
        for (int l = 0; l < c->n_layers; l++)
            *layer_matrix(&w->layers[l], i) =
                take_matrix(cur, dim_of(c, LAYER_MATRICES[i].rows), dim_of(c, LAYER_MATRICES[i].cols));
}

/* Points each array into the data after the header (w->layers allocated by the caller).
 * The file size was checked against the header first, so every pointer stays inside. */
static void map_weights(ac_weights *w, const ac_config *c, const unsigned char *data) {
    uint64_t D = (uint64_t)c->dim, L = (uint64_t)c->n_layers;
    cursor cur = {data, c->group_size};
    if (c->version == 0) {
        w->token_embedding = take_matrix(&cur, c->vocab_size, c->dim);
        w->rms_att = take_floats(&cur, L * D);
        take_layer_matrices(&cur, w, c, 0, 4); /* wq wk wv wo */
        w->rms_ffn = take_floats(&cur, L * D);
        take_layer_matrices(&cur, w, c, 4, N_LAYER_MATRICES); /* w1 w2 w3 */
        w->rms_final = take_floats(&cur, D);
        /* the legacy freq_cis_real / freq_cis_imag tables (seq_len x head_size / 2 each):
         * recomputed, skipped */
        take_floats(&cur, (uint64_t)c->seq_len * (D / (uint64_t)c->n_heads));
    } else {
        w->rms_att = take_floats(&cur, L * D);
        w->rms_ffn = take_floats(&cur, L * D);
        w->rms_final = take_floats(&cur, D);
        w->token_embedding = take_matrix(&cur, c->vocab_size, c->dim);
        take_layer_matrices(&cur, w, c, 0, N_LAYER_MATRICES);
    }
    w->wcls = c->shared_classifier ? w->token_embedding : take_matrix(&cur, c->vocab_size, c->dim);
}

/* ======================================================================== model */

struct ac_model {
    ac_config config;
    ac_weights w;
    const void *data; /* the whole file */
    size_t size;
    int mapped;       /* 1: data is our mmap and is unmapped on free */
    int owned;        /* 1: data is our heap image (an int8 quantization) and is freed */
};

/* The file must hold exactly the weights its (valid) header describes. */
static int check_file_size(const ac_config *c, size_t header_bytes, size_t size, const char *name) {
    uint64_t expected = expected_file_bytes(c, header_bytes);
    if (expected == 0)
        return fail(AC_ERR_FORMAT, "%s: header sizes overflow 64-bit arithmetic", name);
    if (expected != (uint64_t)size)
        return fail(AC_ERR_FORMAT,
                    "%s: file is %zu bytes, header implies %llu (dim=%d hidden_dim=%d n_layers=%d "
                    "n_heads=%d n_kv_heads=%d vocab_size=%d seq_len=%d shared_classifier=%d "
                    "version=%d group_size=%d)",
                    name, size, (unsigned long long)expected, c->dim, c->hidden_dim, c->n_layers,
                    c->n_heads, c->n_kv_heads, c->vocab_size, c->seq_len, c->shared_classifier,
                    c->version, c->group_size);
    return AC_OK;
}

/* Appended to header errors of files without the v1 magic: they may not be models at all
 * (a tokenizer passed as the model, a GGUF file, ...). */
#define V0_HINT " (no \"ak42\" magic, so the file was read as a legacy llama2.c v0 header: " \
                "is it a model file?)"

static int model_from_bytes(const void *data, size_t size, const char *name, ac_model **out) {
    const unsigned char *bytes = data;
    ac_config c;
    size_t header_bytes = 0;
    int rc = parse_header(bytes, size, name, &c, &header_bytes);
    if (rc) return rc;
    if (!(rc = validate_config(&c, name))) rc = check_file_size(&c, header_bytes, size, name);
    if (rc && c.version == 0) append_error(V0_HINT);
    if (rc) return rc;
    ac_model *m = calloc(1, sizeof *m);
    if (m) m->w.layers = calloc((size_t)c.n_layers, sizeof *m->w.layers);
    if (!m || !m->w.layers) {
        free(m);
        return fail(AC_ERR_NOMEM, "%s: out of memory for the model handle", name);
    }
    m->config = c;
    m->data = data;
    m->size = size;
    map_weights(&m->w, &c, bytes + header_bytes);
    *out = m;
    return AC_OK;
}

AC_API int ac_model_load_memory(const void *data, size_t size, const char *name, ac_model **out) {
    if (!out) return fail(AC_ERR_ARG, "ac_model_load_memory: out is NULL");
    *out = NULL;
    if (!name) name = "<memory>";
    if (!data && size) return fail(AC_ERR_ARG, "%s: data is NULL but size is %zu", name, size);
    static const uint32_t no_bytes = 0;
    if (!data) data = &no_bytes; /* size 0 (aligned): parse_header reports the short file */
    if ((uintptr_t)data % sizeof(float))
        return fail(AC_ERR_ARG, "%s: the model buffer must be 4-byte aligned", name);
    return model_from_bytes(data, size, name, out);
}

/* Opens path read-only and checks it is a regular file; returns its descriptor and size.
 * O_NONBLOCK so that a FIFO or device node is refused instead of blocking the open (it has
 * no effect on reading regular files).  what ("model", "tokenizer") is used in messages. */
static int open_regular_file(const char *path, const char *what, int *fd_out, size_t *size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return fail(AC_ERR_IO, "%s: cannot open %s file: %s", path, what, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return fail(AC_ERR_IO, "%s: cannot stat %s file: %s", path, what, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return fail(AC_ERR_IO, "%s: cannot use it as the %s file: it is %s, not a regular file",
                    path, what, S_ISDIR(st.st_mode) ? "a directory" : "a special file");
    }
    *fd_out = fd;
    *size = (size_t)st.st_size;
    return AC_OK;
}

AC_API int ac_model_load(const char *path, ac_model **out) {
    if (!out) return fail(AC_ERR_ARG, "ac_model_load: out is NULL");
    *out = NULL;
    if (!path) return fail(AC_ERR_ARG, "ac_model_load: path is NULL");
    int fd;
    size_t size;
    int rc = open_regular_file(path, "model", &fd, &size);
    if (rc) return rc;
    if (size < V0_HEADER_BYTES) { /* mmap cannot map an empty file; report it as a short file */
        close(fd);
        return fail(AC_ERR_FORMAT, "%s: file is %zu bytes, shorter than a model header (%d bytes)",
                    path, size, V0_HEADER_BYTES);
    }
    void *data = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd); /* the mapping keeps the file alive */
    if (data == MAP_FAILED) return fail(AC_ERR_IO, "%s: cannot mmap model file: %s", path, strerror(e));
    rc = model_from_bytes(data, size, path, out);
    if (rc) {
        munmap(data, size);
        return rc;
    }
    (*out)->mapped = 1;
    return AC_OK;
}

AC_API void ac_model_free(ac_model *m) {
    if (!m) return;
    if (m->mapped) munmap((void *)m->data, m->size);
    if (m->owned) free((void *)m->data);
    free(m->w.layers);
    free(m);
}

AC_API int ac_model_config(const ac_model *m, ac_config *out) {
    if (!m || !out) return fail(AC_ERR_ARG, "ac_model_config: NULL argument");
    *out = m->config;
    return AC_OK;
}

/* ======================================================================== quantize */

/* Writes matrix f (rows, cols) quantized as v2 stores it (int8 values, then the group
 * scales) at p; returns the end. */
static unsigned char *put_quantized(unsigned char *p, const float *f, int rows, int cols, int gs) {
    size_t n = (size_t)rows * (size_t)cols;
    int8_t *q = (int8_t *)p;
    float *scales = (float *)(p + n);
    /* the kernel set's quantizer gives ac_quantize_q8's bytes on every CPU, faster */
    void (*quantize_q8)(int8_t *, float *, const float *, int, int) = ac_kernels_get()->quantize_q8;
    for (size_t r = 0; r < (size_t)rows; r++)
        quantize_q8(q + r * cols, scales + r * (cols / gs), f + r * cols, cols, gs);
    return p + n + n / (size_t)gs * sizeof(float);
}

static unsigned char *put_floats(unsigned char *p, const float *f, size_t n) {
    memcpy(p, f, n * sizeof(float));
    return p + n * sizeof(float);
}

static void put_i32(unsigned char *p, int32_t v) { memcpy(p, &v, sizeof v); }

/* The v2 file image of float32 model src with config c (version 2, c->group_size set). */
static void write_v2_image(unsigned char *img, const ac_model *src, const ac_config *c) {
    const ac_weights *w = &src->w;
    int D = c->dim, L = c->n_layers, V = c->vocab_size, gs = c->group_size;
    memset(img, 0, V1_HEADER_BYTES);
    put_i32(img, (int32_t)MAGIC_V1);
    put_i32(img + 4, 2);
    int32_t params[7] = {D, c->hidden_dim, L, c->n_heads, c->n_kv_heads, V, c->seq_len};
    for (int i = 0; i < 7; i++) put_i32(img + 8 + 4 * i, params[i]);
    img[36] = (unsigned char)c->shared_classifier;
    put_i32(img + 37, gs);
    unsigned char *p = img + V1_HEADER_BYTES;
    p = put_floats(p, w->rms_att, (size_t)L * D);
    p = put_floats(p, w->rms_ffn, (size_t)L * D);
    p = put_floats(p, w->rms_final, (size_t)D);
    p = put_quantized(p, w->token_embedding.f, V, D, gs);
    for (int i = 0; i < N_LAYER_MATRICES; i++)
        for (int l = 0; l < L; l++)
            p = put_quantized(p, layer_matrix(&w->layers[l], i)->f, dim_of(c, LAYER_MATRICES[i].rows),
                              dim_of(c, LAYER_MATRICES[i].cols), gs);
    if (!c->shared_classifier) put_quantized(p, w->wcls.f, V, D, gs);
}

AC_API int ac_model_quantize(const ac_model *src, int group_size, ac_model **out) {
    if (!out) return fail(AC_ERR_ARG, "ac_model_quantize: out is NULL");
    *out = NULL;
    if (!src) return fail(AC_ERR_ARG, "ac_model_quantize: model is NULL");
    if (src->config.group_size)
        return fail(AC_ERR_ARG, "the model is already int8 (group size %d)", src->config.group_size);
    ac_config c = src->config;
    c.version = 2;
    c.group_size = group_size ? group_size : AC_DEFAULT_GROUP_SIZE;
    if (validate_config(&c, "int8 quantization")) return AC_ERR_ARG; /* its message stays */
    uint64_t bytes = expected_file_bytes(&c, V1_HEADER_BYTES);
    void *img = NULL;
    int rc;
    if (bytes == 0 || bytes > SIZE_MAX || posix_memalign(&img, 64, (size_t)bytes) != 0)
        return fail(AC_ERR_NOMEM, "out of memory for the int8 model (%llu bytes)", (unsigned long long)bytes);
    write_v2_image(img, src, &c);
    rc = model_from_bytes(img, (size_t)bytes, "int8 quantization", out);
    if (rc) {
        free(img);
        return rc;
    }
    (*out)->owned = 1;
    return AC_OK;
}

AC_API int ac_model_save(const ac_model *m, const char *path) {
    if (!m || !path) return fail(AC_ERR_ARG, "ac_model_save: NULL argument");
    /* Written next to path, then renamed over it: path may be the file m is mapped from. */
    size_t len = strlen(path);
    char *tmp = malloc(len + 5);
    if (!tmp) return fail(AC_ERR_NOMEM, "ac_model_save: out of memory");
    memcpy(tmp, path, len);
    memcpy(tmp + len, ".tmp", 5);
    FILE *f = fopen(tmp, "wb");
    int ok = f != NULL && fwrite(m->data, 1, m->size, f) == m->size;
    int e = errno;
    if (f && fclose(f) != 0 && ok) {
        ok = 0;
        e = errno;
    }
    if (ok && rename(tmp, path) != 0) {
        ok = 0;
        e = errno;
    }
    if (!ok) remove(tmp);
    free(tmp);
    if (!ok) return fail(AC_ERR_IO, "%s: cannot write the model file: %s", path, strerror(e));
    return AC_OK;
}

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

/* calloc of count elements of size bytes, with an overflow check. */
static void *alloc_array(uint64_t count, size_t size) {
    if (count == 0 || count > SIZE_MAX / size) return NULL;
    return calloc((size_t)count, size);
}

static float *alloc_floats(uint64_t count) { return alloc_array(count, sizeof(float)); }

AC_API void ac_state_free(ac_state *s) {
    if (!s) return;
    ac_pool_free(s->pool);
    free(s->x);
    free(s->xb);
    free(s->xb2);
    free(s->qkv);
    free(s->hb);
    free(s->hb2);
    free(s->xq);
    free(s->xs);
    free(s->row_pos);
    free(s->row_seq);
    free(s->group_start);
    free(s->att);
    free(s->logits);
    free(s->key_cache);
    free(s->value_cache);
    free(s->rope_cos);
    free(s->rope_sin);
    free(s);
}

AC_API int ac_default_threads(void) {
    int n = ac_available_cpus();
    return n < AC_MAX_THREADS ? n : AC_MAX_THREADS;
}

AC_API const char *ac_kernel_name(void) { return ac_kernels_get()->name; }

AC_API int ac_state_set_threads(ac_state *s, int n_threads) {
    if (!s) return fail(AC_ERR_ARG, "ac_state_set_threads: state is NULL");
    if (n_threads < 0 || n_threads > AC_MAX_THREADS)
        return fail(AC_ERR_ARG, "n_threads %d is invalid: it must be in 1..%d (0 = all available cores)",
                    n_threads, AC_MAX_THREADS);
    if (n_threads == 0) n_threads = ac_default_threads();
    if (n_threads == s->n_threads) return AC_OK;
    float *att = alloc_floats((uint64_t)n_threads * ATTENTION_ROWS * (uint64_t)s->model->config.seq_len);
    ac_pool *pool = att ? ac_pool_create(n_threads) : NULL;
    if (!pool) {
        free(att);
        return fail(AC_ERR_NOMEM, "cannot start %d threads (out of memory or thread limit)", n_threads);
    }
    ac_pool_free(s->pool);
    free(s->att);
    s->pool = pool;
    s->att = att;
    s->n_threads = n_threads;
    return AC_OK;
}

/* A state for n_seqs sequences (1 for ac_state_create, the batch size for ac_batch). */
static int state_create(const ac_model *m, int n_seqs, ac_state **out) {
    const ac_config *c = &m->config;
    ac_state *s = calloc(1, sizeof *s);
    if (!s) return fail(AC_ERR_NOMEM, "out of memory for the state");
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
        return fail(AC_ERR_NOMEM, "out of memory for the state (KV cache of %llu floats)",
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
    int rc = ac_state_set_threads(s, 0);
    if (rc) {
        ac_state_free(s);
        return rc;
    }
    *out = s;
    return AC_OK;
}

AC_API int ac_state_create(const ac_model *m, ac_state **out) {
    if (!out) return fail(AC_ERR_ARG, "ac_state_create: out is NULL");
    *out = NULL;
    if (!m) return fail(AC_ERR_ARG, "ac_state_create: model is NULL");
    return state_create(m, 1, out);
}

/* ======================================================================== forward */

/* o = x * (1 / sqrt(mean(x^2) + 1e-5)) * w;  o may alias x. */
static void rmsnorm(float *o, const float *x, const float *w, int n) {
    float ss = 0.0f;
    for (int j = 0; j < n; j++) ss += x[j] * x[j];
    ss = ss / (float)n + 1e-5f;
    float scale = 1.0f / sqrtf(ss);
    for (int j = 0; j < n; j++) o[j] = (x[j] * scale) * w[j];
}

/* x = softmax(x); returns the sum of the exponentials: in [1, n] unless x held an infinity
 * or a NaN (then it is NaN and so is every x[i]). */
static float softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > max) max = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] /= sum;
    return sum;
}

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

/* Runs job over n_units units of work on the state's threads, in a few blocks per thread
 * (claimed dynamically, so a slow thread delays a job by one block at most). */
static void run_job(ac_state *s, ac_pool_fn job, void *arg, int n_units) {
    int blocks = s->n_threads == 1 ? 1 : 4 * s->n_threads;
    if (blocks > n_units) blocks = n_units;
    if (blocks > 0) ac_pool_run(s->pool, job, arg, blocks);
}

/* Matrix rows [r0, r1) times the T input rows x (T, n) into out (row t at out + t * ldo).
 * int8 matrices read the quantized copy of x that quantize_input() left in s->xq / s->xs. */
static void matmul_rows(const ac_state *s, const ac_matrix *W, float *out, int ldo,
                        const float *x, int T, int n, int r0, int r1) {
    if (W->f) s->kern->gemm_f32(out, ldo, W->f, n, x, n, T, n, r0, r1);
    else s->kern->gemm_q8(out, ldo, W->q, W->s, s->xq, s->xs, T, n, s->model->config.group_size, r0, r1);
}

/* For int8 models: quantizes the T rows of x (T, n) into s->xq / s->xs. */
static void quantize_input(ac_state *s, const float *x, int T, int n) {
    int gs = s->model->config.group_size;
    if (gs == 0) return;
    for (int t = 0; t < T; t++)
        s->kern->quantize_q8(s->xq + (size_t)t * n, s->xs + (size_t)t * (n / gs), x + (size_t)t * n, n, gs);
}

/* Rows are split between threads in units of this many (a multiple of the kernels' tiles). */
#define ROW_UNIT 8

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
    for (int t = 0; t < j->T; t++) {
        float *h1 = s->hb + (size_t)t * H, *h3 = s->hb2 + (size_t)t * H;
        for (int i = r0; i < r1; i++) {
            float v = h1[i];
            v = v * (1.0f / (1.0f + expf(-v))); /* silu */
            h1[i] = v * h3[i];
        }
    }
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
        softmax(att, pos + 1);
        float *o = s->xb2 + (size_t)r * D + (size_t)h * head_size;
        s->kern->weighted_sum(o, att, s->value_cache + off, head_size, pos + 1, head_size);
    }
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
    int l, n_groups;
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

/* Row x (D) = the embedding of token (dequantized for int8 models). */
static void embed(const ac_state *s, int token, float *x) {
    const ac_config *c = &s->model->config;
    const ac_matrix *e = &s->model->w.token_embedding;
    size_t D = (size_t)c->dim;
    if (e->f) memcpy(x, e->f + (size_t)token * D, D * sizeof(float));
    else ac_dequantize_q8(x, e->q + (size_t)token * D, e->s + (size_t)token * D / c->group_size,
                          c->dim, c->group_size);
}

/* The transformer over rows [0, n) (n <= max_rows): row r is token tokens[r] at position
 * s->row_pos[r] of sequence s->row_seq[r], and its keys/values go into that sequence's
 * cache.  Rows of one sequence must be consecutive positions in increasing order (a prompt
 * block): every row's keys/values are cached before any row attends, so each row sees the
 * earlier ones.  Logits of rows [first, n) go to out, row r at out + (r - first) * V. */
static void forward_rows(ac_state *s, const int *tokens, int n, int first, float *out) {
    const ac_config *c = &s->model->config;
    const ac_weights *w = &s->model->w;
    int D = c->dim, H = c->hidden_dim, head_size = D / c->n_heads, half = head_size / 2;
    int kv_dim = head_size * c->n_kv_heads, qkv_width = D + 2 * kv_dim;
    for (int r = 0; r < n; r++) embed(s, tokens[r], s->x + (size_t)r * D);
    int n_groups = attention_groups(s, n, s->group_start);
    for (int l = 0; l < c->n_layers; l++) {
        const ac_layer *layer = &w->layers[l];
        for (int r = 0; r < n; r++)
            rmsnorm(s->xb + (size_t)r * D, s->x + (size_t)r * D, w->rms_att + (size_t)l * D, D);
        matmul_job qkv = {s, 3, {&layer->wq, &layer->wk, &layer->wv}, {D, kv_dim, kv_dim},
                          {0, D, D + kv_dim}, s->xb, n, D, s->qkv, qkv_width};
        matmul(s, &qkv);
        for (int r = 0; r < n; r++) {
            float *q = s->qkv + (size_t)r * qkv_width, *k = q + D, *v = k + kv_dim;
            size_t rot = (size_t)s->row_pos[r] * half;
            rope(q, c->n_heads, head_size, s->rope_cos + rot, s->rope_sin + rot);
            rope(k, c->n_kv_heads, head_size, s->rope_cos + rot, s->rope_sin + rot);
            for (int kh = 0; kh < c->n_kv_heads; kh++) {
                size_t row = cache_offset(s, s->row_seq[r], l, kh) + (size_t)s->row_pos[r] * head_size;
                memcpy(s->key_cache + row, k + (size_t)kh * head_size, (size_t)head_size * sizeof(float));
                memcpy(s->value_cache + row, v + (size_t)kh * head_size, (size_t)head_size * sizeof(float));
            }
        }
        attention_job att = {s, l, n_groups};
        run_job(s, attention_task, &att, n_groups * c->n_heads);
        matmul1(s, &layer->wo, s->xb, s->xb2, n, D, D);
        for (size_t i = 0; i < (size_t)n * D; i++) s->x[i] += s->xb[i];
        for (int r = 0; r < n; r++)
            rmsnorm(s->xb + (size_t)r * D, s->x + (size_t)r * D, w->rms_ffn + (size_t)l * D, D);
        quantize_input(s, s->xb, n, D);
        ffn_job ffn = {s, layer, n};
        run_job(s, ffn_up_task, &ffn, (H + ROW_UNIT - 1) / ROW_UNIT);
        matmul1(s, &layer->w2, s->xb, s->hb, n, H, D);
        for (size_t i = 0; i < (size_t)n * D; i++) s->x[i] += s->xb[i];
    }
    if (first >= n) return;
    float *xf = s->x + (size_t)first * D;
    for (int r = 0; r < n - first; r++) rmsnorm(xf + (size_t)r * D, xf + (size_t)r * D, w->rms_final, D);
    matmul1(s, &w->wcls, out, xf, n - first, D, c->vocab_size);
}

/* One token of sequence seq at pos; its logits go to out (V floats). */
static void forward_one(ac_state *s, int seq, int token, int pos, float *out) {
    s->row_pos[0] = pos;
    s->row_seq[0] = seq;
    forward_rows(s, &token, 1, 0, out);
}

/* Prefill: tokens[0..n) of sequence seq at positions pos0.. in blocks of max_rows tokens.
 * With all_logits out receives every token's logits (n, V); otherwise only the last
 * token's (V). */
static void prefill(ac_state *s, int seq, const int *tokens, int n, int pos0, float *out,
                    int all_logits) {
    size_t V = (size_t)s->model->config.vocab_size;
    for (int b = 0; b < n; b += s->max_rows) {
        int m = n - b < s->max_rows ? n - b : s->max_rows;
        for (int r = 0; r < m; r++) {
            s->row_pos[r] = pos0 + b + r;
            s->row_seq[r] = seq;
        }
        if (all_logits) forward_rows(s, tokens + b, m, 0, out + (size_t)b * V);
        else forward_rows(s, tokens + b, m, b + m == n ? m - 1 : m, out);
    }
}

AC_API int ac_forward(ac_state *s, int token, int pos, const float **logits) {
    if (!s) return fail(AC_ERR_ARG, "ac_forward: state is NULL");
    const ac_config *c = &s->model->config;
    if (token < 0 || token >= c->vocab_size)
        return fail(AC_ERR_RANGE, "token %d is outside the vocabulary [0, %d)", token, c->vocab_size);
    if (pos < 0 || pos >= c->seq_len)
        return fail(AC_ERR_RANGE, "position %d is outside the context [0, %d)", pos, c->seq_len);
    forward_one(s, 0, token, pos, s->logits);
    if (logits) *logits = s->logits;
    return AC_OK;
}

static int check_tokens(const int *tokens, int n, int vocab_size) {
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= vocab_size)
            return fail(AC_ERR_RANGE, "token %d (at index %d) is outside the vocabulary [0, %d)",
                        tokens[i], i, vocab_size);
    return AC_OK;
}

/* The argument checks of ac_logits and ac_logits_stepwise. */
static int check_logits_args(const ac_state *s, const int *tokens, int n_tokens, const float *out,
                             const char *fn) {
    if (!s) return fail(AC_ERR_ARG, "%s: state is NULL", fn);
    if (n_tokens < 0 || (n_tokens > 0 && (!tokens || !out)))
        return fail(AC_ERR_ARG, "%s: bad arguments (n_tokens=%d)", fn, n_tokens);
    const ac_config *c = &s->model->config;
    if (n_tokens > c->seq_len)
        return fail(AC_ERR_RANGE, "%d tokens exceed the model's seq_len %d", n_tokens, c->seq_len);
    return check_tokens(tokens, n_tokens, c->vocab_size);
}

AC_API int ac_logits(ac_state *s, const int *tokens, int n_tokens, float *out) {
    int rc = check_logits_args(s, tokens, n_tokens, out, "ac_logits");
    if (rc) return rc;
    prefill(s, 0, tokens, n_tokens, 0, out, 1);
    return AC_OK;
}

AC_API int ac_logits_stepwise(ac_state *s, const int *tokens, int n_tokens, float *out) {
    int rc = check_logits_args(s, tokens, n_tokens, out, "ac_logits_stepwise");
    if (rc) return rc;
    size_t V = (size_t)s->model->config.vocab_size;
    for (int t = 0; t < n_tokens; t++) forward_one(s, 0, tokens[t], t, out + (size_t)t * V);
    return AC_OK;
}

/* ======================================================================== tokenizer */

struct ac_tokenizer {
    int vocab_size;
    int max_token_length;
    unsigned char *blob;        /* private copy of the file; pieces point into it */
    const char **pieces;        /* (V) piece bytes, not NUL-terminated */
    int *lens;                  /* (V) */
    float *scores;              /* (V) */
    short *byte_value;          /* (V) the byte of a "<0xNN>" piece, else -1 */
    int *sorted;                /* normal piece ids sorted by bytes, then id */
    int n_sorted;
    int byte_id[256];           /* id of the "<0xNN>" piece of each byte, -1 if absent */
    unsigned char bytes[256];   /* bytes[i] == i: stable storage for decoded byte pieces */
};

AC_API void ac_tokenizer_free(ac_tokenizer *t) {
    if (!t) return;
    free(t->blob);
    free(t->pieces);
    free(t->lens);
    free(t->scores);
    free(t->byte_value);
    free(t->sorted);
    free(t);
}

static int hex_digit(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    return -1;
}

/* The byte a "<0xNN>" byte-fallback piece stands for, or -1 for any other piece. */
static int parse_byte_piece(const char *p, int len) {
    if (len != 6 || p[0] != '<' || p[1] != '0' || p[2] != 'x' || p[5] != '>') return -1;
    int hi = hex_digit(p[3]), lo = hex_digit(p[4]);
    return (hi < 0 || lo < 0) ? -1 : hi * 16 + lo;
}

/* Lexicographic byte order, shorter first on a common prefix. */
static int compare_bytes(const char *a, int alen, const char *b, int blen) {
    int n = alen < blen ? alen : blen;
    int r = memcmp(a, b, (size_t)n);
    if (r) return r;
    return (alen > blen) - (alen < blen);
}

/* qsort has no context argument; the tokenizer being sorted is passed through this
 * thread-local (loading is single-threaded per call, and each thread has its own). */
static _Thread_local const ac_tokenizer *g_sorting;

static int compare_ids(const void *pa, const void *pb) {
    int a = *(const int *)pa, b = *(const int *)pb;
    const ac_tokenizer *t = g_sorting;
    int r = compare_bytes(t->pieces[a], t->lens[a], t->pieces[b], t->lens[b]);
    return r ? r : (a > b) - (a < b);
}

/* Walks the file and counts its pieces, checking each header and length.  Stops with an
 * error at the first piece that does not fit. */
static int scan_tokenizer(const unsigned char *data, size_t size, const char *name, int *max_len,
                          long long *n_pieces) {
    if (size < 4)
        return fail(AC_ERR_FORMAT, "%s: %zu bytes is too short for a tokenizer header (4 bytes)",
                    name, size);
    *max_len = read_i32(data);
    if (*max_len < 0 || *max_len > AC_MAX_PIECE_BYTES)
        return fail(AC_ERR_FORMAT, "%s: max_token_length is %d, expected 0..%d", name, *max_len,
                    AC_MAX_PIECE_BYTES);
    size_t pos = 4;
    long long n = 0;
    while (pos < size) {
        if (size - pos < 8)
            return fail(AC_ERR_FORMAT, "%s: piece %lld header runs past the end of the file "
                        "(%zu bytes left, 8 needed)", name, n, size - pos);
        float score = read_f32(data + pos);
        int32_t len = read_i32(data + pos + 4);
        if (isnan(score)) return fail(AC_ERR_FORMAT, "%s: piece %lld has a NaN score", name, n);
        if (len < 0 || len > *max_len)
            return fail(AC_ERR_FORMAT, "%s: piece %lld has length %d, expected 0..%d "
                        "(max_token_length)", name, n, len, *max_len);
        pos += 8;
        if ((size_t)len > size - pos)
            return fail(AC_ERR_FORMAT, "%s: piece %lld (length %d) runs past the end of the file",
                        name, n, len);
        pos += (size_t)len;
        n++;
    }
    *n_pieces = n;
    return AC_OK;
}

/* Fills the piece tables from the (already validated) blob and builds the lookup index. */
static int index_tokenizer(ac_tokenizer *t, const char *name) {
    int V = t->vocab_size;
    t->pieces = calloc((size_t)V, sizeof *t->pieces);
    t->lens = calloc((size_t)V, sizeof *t->lens);
    t->scores = calloc((size_t)V, sizeof *t->scores);
    t->byte_value = calloc((size_t)V, sizeof *t->byte_value);
    t->sorted = calloc((size_t)V, sizeof *t->sorted);
    if (!t->pieces || !t->lens || !t->scores || !t->byte_value || !t->sorted)
        return fail(AC_ERR_NOMEM, "%s: out of memory for %d tokenizer pieces", name, V);
    for (int b = 0; b < 256; b++) {
        t->byte_id[b] = -1;
        t->bytes[b] = (unsigned char)b;
    }
    size_t pos = 4;
    for (int i = 0; i < V; i++) {
        t->scores[i] = read_f32(t->blob + pos);
        t->lens[i] = read_i32(t->blob + pos + 4);
        t->pieces[i] = (const char *)t->blob + pos + 8;
        pos += 8 + (size_t)t->lens[i];
        int b = parse_byte_piece(t->pieces[i], t->lens[i]);
        t->byte_value[i] = (short)b;
        if (b >= 0 && t->byte_id[b] < 0) t->byte_id[b] = i;
        /* "normal" pieces are the ones merges may produce: not the specials, not bytes */
        if (i > AC_TOKEN_EOS && b < 0) t->sorted[t->n_sorted++] = i;
    }
    g_sorting = t;
    qsort(t->sorted, (size_t)t->n_sorted, sizeof *t->sorted, compare_ids);
    g_sorting = NULL;
    return AC_OK;
}

static int tokenizer_from_bytes(const void *data, size_t size, int vocab_size, const char *name,
                                ac_tokenizer **out) {
    int max_len = 0;
    long long n_pieces = 0;
    int rc = scan_tokenizer(data, size, name, &max_len, &n_pieces);
    if (rc) return rc;
    if (n_pieces != vocab_size)
        return fail(AC_ERR_MISMATCH, "%s: tokenizer has %lld pieces but the model's vocab_size is %d",
                    name, n_pieces, vocab_size);
    ac_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return fail(AC_ERR_NOMEM, "%s: out of memory for the tokenizer", name);
    t->vocab_size = vocab_size;
    t->max_token_length = max_len;
    t->blob = malloc(size);
    if (!t->blob) {
        ac_tokenizer_free(t);
        return fail(AC_ERR_NOMEM, "%s: out of memory for %zu tokenizer bytes", name, size);
    }
    memcpy(t->blob, data, size);
    if ((rc = index_tokenizer(t, name))) {
        ac_tokenizer_free(t);
        return rc;
    }
    *out = t;
    return AC_OK;
}

AC_API int ac_tokenizer_load_memory(const void *data, size_t size, int vocab_size, const char *name,
                                    ac_tokenizer **out) {
    if (!out) return fail(AC_ERR_ARG, "ac_tokenizer_load_memory: out is NULL");
    *out = NULL;
    if (!name) name = "<memory>";
    if (!data && size) return fail(AC_ERR_ARG, "%s: data is NULL but size is %zu", name, size);
    if (vocab_size < AC_MIN_VOCAB || vocab_size > AC_MAX_VOCAB)
        return fail(AC_ERR_ARG, "%s: vocab_size %d is outside %d..%d", name, vocab_size,
                    AC_MIN_VOCAB, AC_MAX_VOCAB);
    return tokenizer_from_bytes(data ? data : "", size, vocab_size, name, out);
}

/* Tokenizer files up to this size are always read in, so that scan_tokenizer can name the
 * piece at fault; larger ones must also pass check_tokenizer_size first. */
#define TOKENIZER_ALWAYS_READ (16u << 20)

/* A tokenizer of vocab_size pieces of at most max_token_length bytes each (the file's first
 * field) has at most 4 + vocab_size * (8 + max_token_length) bytes: a large file over that
 * is refused before it is read into memory.  Everything else is left to scan_tokenizer. */
static int check_tokenizer_size(int fd, size_t size, int vocab_size, const char *path) {
    unsigned char header[4];
    if (size <= TOKENIZER_ALWAYS_READ || vocab_size < AC_MIN_VOCAB || vocab_size > AC_MAX_VOCAB ||
        pread(fd, header, sizeof header, 0) != (ssize_t)sizeof header)
        return AC_OK;
    int max_len = read_i32(header);
    if (max_len < 0 || max_len > AC_MAX_PIECE_BYTES) return AC_OK;
    uint64_t most = 4 + (uint64_t)vocab_size * (8 + (uint64_t)max_len);
    if (size <= most) return AC_OK;
    return fail(AC_ERR_FORMAT, "%s: file is %zu bytes, more than a tokenizer of %d pieces of at most "
                "%d bytes (max_token_length) can be (%llu bytes)", path, size, vocab_size, max_len,
                (unsigned long long)most);
}

AC_API int ac_tokenizer_load(const char *path, int vocab_size, ac_tokenizer **out) {
    if (!out) return fail(AC_ERR_ARG, "ac_tokenizer_load: out is NULL");
    *out = NULL;
    if (!path) return fail(AC_ERR_ARG, "ac_tokenizer_load: path is NULL");
    int fd;
    size_t size;
    int rc = open_regular_file(path, "tokenizer", &fd, &size);
    if (rc) return rc;
    if ((rc = check_tokenizer_size(fd, size, vocab_size, path))) {
        close(fd);
        return rc;
    }
    unsigned char *buf = malloc(size ? size : 1);
    if (!buf) {
        close(fd);
        return fail(AC_ERR_NOMEM, "%s: out of memory for %zu tokenizer bytes", path, size);
    }
    size_t got = 0;
    int e = 0;
    while (got < size) { /* read() may return less than asked */
        ssize_t n = read(fd, buf + got, size - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) e = errno;
        if (n <= 0) break;
        got += (size_t)n;
    }
    close(fd);
    if (got != size) {
        free(buf);
        return fail(AC_ERR_IO, "%s: read %zu of %zu tokenizer bytes: %s", path, got, size,
                    e ? strerror(e) : "the file shrank while reading");
    }
    rc = ac_tokenizer_load_memory(buf, size, vocab_size, path, out);
    free(buf);
    return rc;
}

AC_API int ac_tokenizer_vocab_size(const ac_tokenizer *t) { return t ? t->vocab_size : 0; }

AC_API int ac_tokenizer_piece(const ac_tokenizer *t, int id, const char **piece, size_t *len,
                              float *score) {
    if (!t) return fail(AC_ERR_ARG, "ac_tokenizer_piece: tokenizer is NULL");
    if (id < 0 || id >= t->vocab_size)
        return fail(AC_ERR_RANGE, "token %d is outside the vocabulary [0, %d)", id, t->vocab_size);
    if (piece) *piece = t->pieces[id];
    if (len) *len = (size_t)t->lens[id];
    if (score) *score = t->scores[id];
    return AC_OK;
}

/* The id of the normal piece with exactly these bytes, or -1. */
static int lookup_piece(const ac_tokenizer *t, const char *s, int len) {
    int lo = 0, hi = t->n_sorted; /* lower bound: the lowest id among equal pieces */
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2, id = t->sorted[mid];
        if (compare_bytes(t->pieces[id], t->lens[id], s, len) < 0) lo = mid + 1;
        else hi = mid;
    }
    if (lo < t->n_sorted) {
        int id = t->sorted[lo];
        if (compare_bytes(t->pieces[id], t->lens[id], s, len) == 0) return id;
    }
    return -1;
}

/* Length of the well-formed UTF-8 character at s[0..n), or 0 if the byte at s starts no
 * well-formed character (it then becomes a symbol of its own). */
static int utf8_char_len(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    int len;
    unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0) lo = 0xA0;      /* no overlong forms */
        else if (c == 0xED) hi = 0x9F; /* no surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0) lo = 0x90;
        else if (c == 0xF4) hi = 0x8F; /* nothing above U+10FFFF */
    } else
        return 0;
    if ((size_t)len > n) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (int i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return len;
}

/* BPE merge state: a doubly linked list of symbols over the normalized text, and a binary
 * max-heap of candidate merges, as SentencePiece's bpe_model does it. */
typedef struct {
    int start, len; /* bytes of the normalized text; len 0 = merged away */
    int id;         /* normal piece id, or -1 (falls back to byte tokens) */
    int prev, next;
} bpe_symbol;

typedef struct {
    float score;
    int left, right; /* symbol indices */
    int len;         /* bytes of the merged piece, to detect stale entries */
    int id;
} bpe_pair;

/* Higher score first; on equal scores the leftmost pair (SentencePiece's tie rule). */
static int pair_before(const bpe_pair *a, const bpe_pair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(bpe_pair *heap, int *n, bpe_pair p) {
    int i = (*n)++;
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (!pair_before(&p, &heap[parent])) break;
        heap[i] = heap[parent];
        i = parent;
    }
    heap[i] = p;
}

static bpe_pair heap_pop(bpe_pair *heap, int *n) {
    bpe_pair top = heap[0], last = heap[--(*n)];
    int i = 0;
    for (;;) {
        int child = 2 * i + 1;
        if (child >= *n) break;
        if (child + 1 < *n && pair_before(&heap[child + 1], &heap[child])) child++;
        if (!pair_before(&heap[child], &last)) break;
        heap[i] = heap[child];
        i = child;
    }
    if (*n > 0) heap[i] = last;
    return top;
}

/* Queues the merge of symbols left and right if their concatenation is a normal piece. */
static void try_pair(const ac_tokenizer *t, const char *text, const bpe_symbol *sym, int left,
                     int right, bpe_pair *heap, int *n_heap) {
    if (left < 0 || right < 0) return;
    int len = sym[left].len + sym[right].len;
    int id = lookup_piece(t, text + sym[left].start, len); /* symbols are contiguous */
    if (id < 0) return;
    bpe_pair p = {t->scores[id], left, right, len, id};
    heap_push(heap, n_heap, p);
}

/* Encodes into out (capacity >= len + 3) and returns the count; -1 on allocation failure. */
static int encode_into(const ac_tokenizer *t, const char *text, size_t len, int bos, int eos,
                       int *out) {
    int n = 0;
    if (bos) out[n++] = AC_TOKEN_BOS;
    if (len > 0) {
        /* normalization: identity, plus SentencePiece's dummy-prefix space */
        size_t n_text = len + 1;
        char *norm = malloc(n_text);
        bpe_symbol *sym = malloc(n_text * sizeof *sym);
        bpe_pair *heap = malloc(3 * n_text * sizeof *heap); /* n-1 initial + 2 per merge */
        if (!norm || !sym || !heap) {
            free(norm);
            free(sym);
            free(heap);
            return -1;
        }
        norm[0] = ' ';
        memcpy(norm + 1, text, len);

        int n_sym = 0;
        for (size_t i = 0; i < n_text;) {
            int clen = utf8_char_len((const unsigned char *)norm + i, n_text - i);
            if (clen == 0) clen = 1; /* a stray byte: its own symbol, byte fallback later */
            sym[n_sym] = (bpe_symbol){(int)i, clen, lookup_piece(t, norm + i, clen), n_sym - 1, n_sym + 1};
            n_sym++;
            i += (size_t)clen;
        }
        sym[n_sym - 1].next = -1;

        int n_heap = 0;
        for (int i = 0; i + 1 < n_sym; i++) try_pair(t, norm, sym, i, i + 1, heap, &n_heap);
        while (n_heap > 0) {
            bpe_pair p = heap_pop(heap, &n_heap);
            bpe_symbol *l = &sym[p.left], *r = &sym[p.right];
            /* skip entries made stale by an earlier merge of either side */
            if (l->len == 0 || r->len == 0 || l->next != p.right || l->len + r->len != p.len) continue;
            l->len = p.len;
            l->id = p.id;
            l->next = r->next;
            if (r->next >= 0) sym[r->next].prev = p.left;
            r->len = 0;
            try_pair(t, norm, sym, l->prev, p.left, heap, &n_heap);
            try_pair(t, norm, sym, p.left, l->next, heap, &n_heap);
        }

        for (int i = 0; i >= 0; i = sym[i].next) {
            if (sym[i].id >= 0) {
                out[n++] = sym[i].id;
                continue;
            }
            /* byte fallback: one token per byte of a character the vocabulary lacks */
            for (int b = 0; b < sym[i].len; b++) {
                int id = t->byte_id[(unsigned char)norm[sym[i].start + b]];
                out[n++] = id >= 0 ? id : AC_TOKEN_UNK;
            }
        }
        free(norm);
        free(sym);
        free(heap);
    }
    if (eos) out[n++] = AC_TOKEN_EOS;
    return n;
}

AC_API int ac_encode(const ac_tokenizer *t, const char *text, size_t len, int bos, int eos,
                     int *tokens, int max_tokens, int *n_tokens) {
    if (!t || !n_tokens || (!text && len > 0) || (!tokens && max_tokens > 0) || max_tokens < 0)
        return fail(AC_ERR_ARG, "ac_encode: bad arguments");
    if (len > (size_t)INT_MAX / 4)
        return fail(AC_ERR_RANGE, "ac_encode: text of %zu bytes is too long", len);
    size_t cap = len + 3;
    int *buf = tokens;
    if ((size_t)max_tokens < cap) { /* the exact count is unknown until encoded: use scratch */
        buf = malloc(cap * sizeof *buf);
        if (!buf) return fail(AC_ERR_NOMEM, "ac_encode: out of memory");
    }
    int n = encode_into(t, text, len, bos != 0, eos != 0, buf);
    if (n < 0) {
        if (buf != tokens) free(buf);
        return fail(AC_ERR_NOMEM, "ac_encode: out of memory for %zu bytes of text", len);
    }
    *n_tokens = n;
    if (buf != tokens) {
        int fits = n <= max_tokens;
        if (fits) memcpy(tokens, buf, (size_t)n * sizeof *buf);
        free(buf);
        if (!fits)
            return fail(AC_ERR_RANGE, "ac_encode: %d tokens do not fit in max_tokens %d", n, max_tokens);
    }
    return AC_OK;
}

AC_API int ac_decode_piece(const ac_tokenizer *t, int prev, int token, const char **piece,
                           size_t *len) {
    if (!t || !piece || !len) return fail(AC_ERR_ARG, "ac_decode_piece: NULL argument");
    if (token < 0 || token >= t->vocab_size)
        return fail(AC_ERR_RANGE, "token %d is outside the vocabulary [0, %d)", token, t->vocab_size);
    const char *p = t->pieces[token];
    int n = t->lens[token];
    if (token <= AC_TOKEN_EOS) {
        n = 0; /* <unk>, <s>, </s> are markers, not text */
    } else if (t->byte_value[token] >= 0) {
        p = (const char *)&t->bytes[t->byte_value[token]];
        n = 1;
    } else if (prev == AC_TOKEN_BOS && n > 0 && p[0] == ' ') {
        p++; /* the dummy-prefix space SentencePiece added in front of the text */
        n--;
    }
    if (n == 1) { /* never hand out raw control bytes, except line breaks and tabs */
        unsigned char b = (unsigned char)p[0];
        if ((b < 0x20 && b != '\n' && b != '\t' && b != '\r') || b == 0x7f) n = 0;
    }
    *piece = p;
    *len = (size_t)n;
    return AC_OK;
}

/* ======================================================================== sampler */

struct ac_sampler {
    ac_sampler_params params;
    int vocab_size;
    uint64_t rng;   /* xorshift64* state, never 0 */
    float *probs;   /* (V) scratch */
    int *order;     /* (V) candidate ids, sorted by probability */
    int *order_tmp; /* (V) scratch of sort_by_prob */
    uint32_t *keys; /* (2V) scratch of sort_by_prob */
};

#define DEFAULT_SEED 0x9E3779B97F4A7C15ull

AC_API ac_sampler_params ac_sampler_default_params(void) {
    ac_sampler_params p = {1.0f, 0.9f, 0, 0};
    return p;
}

static int check_sampler_params(const ac_sampler_params *p) {
    if (isnan(p->temperature) || p->temperature < 0.0f)
        return fail(AC_ERR_ARG, "temperature %g is invalid: it must be >= 0 (0 = greedy)",
                    (double)p->temperature);
    if (isnan(p->top_p) || !(p->top_p > 0.0f && p->top_p <= 1.0f))
        return fail(AC_ERR_ARG, "top_p %g is invalid: it must be in (0, 1] (1 = off)", (double)p->top_p);
    if (p->top_k < 0)
        return fail(AC_ERR_ARG, "top_k %d is invalid: it must be >= 0 (0 = off)", p->top_k);
    return AC_OK;
}

AC_API int ac_sampler_create(const ac_sampler_params *params, int vocab_size, ac_sampler **out) {
    if (!out) return fail(AC_ERR_ARG, "ac_sampler_create: out is NULL");
    *out = NULL;
    ac_sampler_params p = params ? *params : ac_sampler_default_params();
    int rc = check_sampler_params(&p);
    if (rc) return rc;
    if (vocab_size <= 0 || vocab_size > AC_MAX_VOCAB)
        return fail(AC_ERR_ARG, "vocab_size %d is outside 1..%d", vocab_size, AC_MAX_VOCAB);
    ac_sampler *s = calloc(1, sizeof *s);
    if (!s) return fail(AC_ERR_NOMEM, "out of memory for the sampler");
    s->params = p;
    s->vocab_size = vocab_size;
    s->rng = p.seed ? p.seed : DEFAULT_SEED;
    s->probs = malloc((size_t)vocab_size * sizeof *s->probs);
    s->order = malloc((size_t)vocab_size * sizeof *s->order);
    s->order_tmp = malloc((size_t)vocab_size * sizeof *s->order_tmp);
    s->keys = malloc(2 * (size_t)vocab_size * sizeof *s->keys);
    if (!s->probs || !s->order || !s->order_tmp || !s->keys) {
        ac_sampler_free(s);
        return fail(AC_ERR_NOMEM, "out of memory for the sampler");
    }
    *out = s;
    return AC_OK;
}

AC_API void ac_sampler_free(ac_sampler *s) {
    if (!s) return;
    free(s->probs);
    free(s->order);
    free(s->order_tmp);
    free(s->keys);
    free(s);
}

/* xorshift64*: small, fast and identical on every platform. */
static uint64_t rng_next(uint64_t *state) {
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

/* Uniform in [0, 1), from the top 24 bits (exactly representable in a float). */
static float rng_float(uint64_t *state) { return (float)(rng_next(state) >> 40) / 16777216.0f; }

/* First index of the largest value; NaNs never win (0 when all are NaN). */
static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best] || (isnan(x[best]) && !isnan(x[i]))) best = i;
    return best;
}

/* Sorts the candidates s->order[0..n) by descending probability, equal probabilities in
 * increasing id order (so the top candidate agrees with argmax).  The ids arrive in
 * increasing order and this is a stable LSD radix sort on the bits of the probabilities,
 * which (for the non-negative, non-NaN floats of candidates) order like the floats: ~bits
 * ascending is probability descending.  It replaced qsort with a comparison callback, which
 * took ~13% of int8 decode time with the default top-p (the persona keeps hundreds to
 * thousands of candidates per token): int8 decode 1.15x, batched decode 1.22x (measured). */
static void sort_by_prob(ac_sampler *s, int n) {
    if (n < 2) return;
    int *ids = s->order, *ids_out = s->order_tmp;
    uint32_t *key = s->keys, *key_out = s->keys + n;
    for (int i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &s->probs[ids[i]], sizeof bits);
        key[i] = ~bits;
    }
    for (int shift = 0; shift < 32; shift += 8) {
        int start[257] = {0};
        for (int i = 0; i < n; i++) start[((key[i] >> shift) & 255) + 1]++;
        if (start[((key[0] >> shift) & 255) + 1] == n) continue; /* one digit value: order kept */
        for (int d = 0; d < 256; d++) start[d + 1] += start[d];
        for (int i = 0; i < n; i++) {
            int at = start[(key[i] >> shift) & 255]++;
            key_out[at] = key[i];
            ids_out[at] = ids[i];
        }
        uint32_t *key_in = key;
        key = key_out;
        key_out = key_in;
        int *ids_in = ids;
        ids = ids_out;
        ids_out = ids_in;
    }
    if (ids != s->order) memcpy(s->order, ids, (size_t)n * sizeof *ids);
}

/* Walks candidates ids[0..n) with weights probs[id] until the cumulative weight passes r. */
static int pick(const float *probs, const int *ids, int n, float r) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        int id = ids ? ids[i] : i;
        cdf += probs[id];
        if (r < cdf) return id;
    }
    return ids ? ids[n - 1] : n - 1; /* rounding left r just above the total */
}

AC_API int ac_sample(ac_sampler *s, const float *logits, int *token) {
    if (!s || !logits || !token) return fail(AC_ERR_ARG, "ac_sample: NULL argument");
    int V = s->vocab_size;
    const ac_sampler_params *p = &s->params;
    if (p->temperature == 0.0f) {
        *token = argmax(logits, V);
        return AC_OK;
    }
    float *probs = s->probs;
    for (int i = 0; i < V; i++) probs[i] = logits[i] / p->temperature;
    if (!isfinite(softmax(probs, V))) {
        /* a temperature so small that logits / temperature overflow (whose limit is greedy
         * decoding), or NaN logits from a corrupt model: greedy, never an arbitrary token */
        *token = argmax(logits, V);
        return AC_OK;
    }
    float coin = rng_float(&s->rng);
    int use_k = p->top_k > 0 && p->top_k < V, use_p = p->top_p < 1.0f;
    if (!use_k && !use_p) {
        *token = pick(probs, NULL, V, coin);
        return AC_OK;
    }
    /* Candidates.  With top-p alone, a token below (1 - p) / (V - 1) can never be in the
     * nucleus (all such tokens together hold less than 1 - p), so skip sorting them. */
    float cutoff = (!use_k && V > 1) ? (1.0f - p->top_p) / (float)(V - 1) : 0.0f;
    int n = 0;
    for (int i = 0; i < V; i++)
        if (probs[i] >= cutoff) s->order[n++] = i;
    if (n == 0) { /* only if every probability is NaN: fall back to greedy */
        *token = argmax(logits, V);
        return AC_OK;
    }
    sort_by_prob(s, n);
    if (use_k && n > p->top_k) n = p->top_k;
    float total = 0.0f;
    for (int i = 0; i < n; i++) total += probs[s->order[i]];
    if (use_p) { /* the smallest prefix whose (renormalized) mass exceeds top_p */
        float cum = 0.0f, mass = 0.0f;
        int keep = n;
        for (int i = 0; i < n; i++) {
            cum += probs[s->order[i]] / total;
            mass += probs[s->order[i]];
            if (cum > p->top_p) {
                keep = i + 1;
                break;
            }
        }
        if (keep < n) total = mass;
        n = keep;
    }
    *token = pick(probs, s->order, n, coin * total);
    return AC_OK;
}

/* ======================================================================== session */

struct ac_session {
    const ac_model *model;
    const ac_tokenizer *tok;
    ac_state *state;
    ac_sampler *sampler;
    int pos;         /* positions already in the KV cache */
    int pending;     /* sampled but not yet run through the model, or -1 */
    int last;        /* the token at pos - 1 (or pending), for decoding; -1 at the start */
    int has_logits;  /* state->logits belong to the token at pos - 1 */
    int ignore_eos;  /* ac_generate goes on past BOS/EOS (ac_session_set_ignore_eos) */
};

AC_API void ac_session_free(ac_session *s) {
    if (!s) return;
    ac_state_free(s->state);
    ac_sampler_free(s->sampler);
    free(s);
}

AC_API void ac_session_reset(ac_session *s) {
    if (!s) return;
    s->pos = 0;
    s->pending = -1;
    s->last = -1;
    s->has_logits = 0;
}

AC_API int ac_session_create(const ac_model *m, const ac_tokenizer *tok,
                             const ac_sampler_params *params, ac_session **out) {
    if (!out) return fail(AC_ERR_ARG, "ac_session_create: out is NULL");
    *out = NULL;
    if (!m || !tok) return fail(AC_ERR_ARG, "ac_session_create: model and tokenizer are required");
    if (tok->vocab_size != m->config.vocab_size)
        return fail(AC_ERR_MISMATCH, "tokenizer has %d pieces but the model's vocab_size is %d",
                    tok->vocab_size, m->config.vocab_size);
    ac_session *s = calloc(1, sizeof *s);
    if (!s) return fail(AC_ERR_NOMEM, "out of memory for the session");
    s->model = m;
    s->tok = tok;
    int rc = ac_sampler_create(params, m->config.vocab_size, &s->sampler);
    if (!rc) rc = ac_state_create(m, &s->state);
    if (rc) {
        ac_session_free(s);
        return rc;
    }
    ac_session_reset(s);
    *out = s;
    return AC_OK;
}

AC_API int ac_session_position(const ac_session *s) { return s ? s->pos : 0; }

AC_API int ac_session_set_threads(ac_session *s, int n_threads) {
    if (!s) return fail(AC_ERR_ARG, "ac_session_set_threads: session is NULL");
    return ac_state_set_threads(s->state, n_threads);
}

AC_API int ac_session_set_ignore_eos(ac_session *s, int ignore) {
    if (!s) return fail(AC_ERR_ARG, "ac_session_set_ignore_eos: session is NULL");
    s->ignore_eos = ignore != 0;
    return AC_OK;
}

/* Whether a sampled token ends the text: BOS or EOS, unless those are ignored. */
static int is_stop(int token, int ignore_eos) {
    return !ignore_eos && (token == AC_TOKEN_BOS || token == AC_TOKEN_EOS);
}

static void run_token(ac_session *s, int token) {
    forward_one(s->state, 0, token, s->pos++, s->state->logits);
    s->last = token;
    s->has_logits = 1;
}

AC_API int ac_session_feed_tokens(ac_session *s, const int *tokens, int n_tokens) {
    if (!s || n_tokens < 0 || (n_tokens > 0 && !tokens))
        return fail(AC_ERR_ARG, "ac_session_feed_tokens: bad arguments");
    int seq_len = s->model->config.seq_len;
    int rc = check_tokens(tokens, n_tokens, s->model->config.vocab_size);
    if (rc) return rc;
    long long needed = (long long)s->pos + (s->pending >= 0) + n_tokens;
    if (needed > seq_len)
        return fail(AC_ERR_RANGE, "%d tokens do not fit: %d of the model's seq_len %d are in use",
                    n_tokens, s->pos + (s->pending >= 0), seq_len);
    if (s->pending >= 0) {
        run_token(s, s->pending);
        s->pending = -1;
    }
    if (n_tokens > 0) { /* one prefill pass: matrix-matrix products over the tokens */
        prefill(s->state, 0, tokens, n_tokens, s->pos, s->state->logits, 0);
        s->pos += n_tokens;
        s->last = tokens[n_tokens - 1];
        s->has_logits = 1;
    }
    return AC_OK;
}

AC_API int ac_session_feed(ac_session *s, const char *text, size_t len, int bos) {
    if (!s || (!text && len > 0)) return fail(AC_ERR_ARG, "ac_session_feed: bad arguments");
    if (len > (size_t)INT_MAX / 4) return fail(AC_ERR_RANGE, "ac_session_feed: text is too long");
    int cap = (int)len + 3, n;
    int *tokens = malloc((size_t)cap * sizeof *tokens);
    if (!tokens) return fail(AC_ERR_NOMEM, "ac_session_feed: out of memory");
    int rc = ac_encode(s->tok, text, len, bos, 0, tokens, cap, &n);
    if (!rc) rc = ac_session_feed_tokens(s, tokens, n);
    free(tokens);
    return rc;
}

AC_API int ac_session_next(ac_session *s, int *token, const char **piece, size_t *len) {
    if (!s || !token) return fail(AC_ERR_ARG, "ac_session_next: NULL argument");
    int seq_len = s->model->config.seq_len;
    *token = -1;
    if (piece) *piece = "";
    if (len) *len = 0;
    if (s->pending >= 0) {
        if (s->pos >= seq_len) return AC_OK; /* no room to run it: the context is full */
        run_token(s, s->pending);
        s->pending = -1;
    }
    /* a sampled token takes position pos; beyond seq_len - 1 it could never be run */
    if (!s->has_logits || s->pos >= seq_len) return AC_OK;
    int next, rc = ac_sample(s->sampler, s->state->logits, &next);
    if (rc) return rc;
    const char *p;
    size_t n;
    if ((rc = ac_decode_piece(s->tok, s->last, next, &p, &n))) return rc;
    s->pending = next;
    *token = next;
    if (piece) *piece = p;
    if (len) *len = n;
    return AC_OK;
}

AC_API int ac_generate(ac_session *s, const char *prompt, size_t len, int max_new_tokens,
                       ac_piece_fn on_piece, void *user, int *n_generated) {
    if (n_generated) *n_generated = 0;
    if (!s || (!prompt && len > 0)) return fail(AC_ERR_ARG, "ac_generate: bad arguments");
    if (max_new_tokens < 0)
        return fail(AC_ERR_ARG, "max_new_tokens %d is invalid: it must be >= 0", max_new_tokens);
    if (len > (size_t)INT_MAX / 4) return fail(AC_ERR_RANGE, "ac_generate: prompt is too long");
    ac_session_reset(s);
    int cap = (int)len + 3, n_prompt;
    int *tokens = malloc((size_t)cap * sizeof *tokens);
    if (!tokens) return fail(AC_ERR_NOMEM, "ac_generate: out of memory");
    int rc = ac_encode(s->tok, prompt, len, 1, 0, tokens, cap, &n_prompt);
    if (!rc && n_prompt > s->model->config.seq_len)
        rc = fail(AC_ERR_RANGE, "the prompt is %d tokens (BOS included) but the model's seq_len is %d",
                  n_prompt, s->model->config.seq_len);
    if (!rc) rc = ac_session_feed_tokens(s, tokens, n_prompt);
    free(tokens);
    if (rc) return rc;
    int n = 0;
    while (n < max_new_tokens) {
        int token;
        const char *piece;
        size_t piece_len;
        if ((rc = ac_session_next(s, &token, &piece, &piece_len))) break;
        if (token < 0 || is_stop(token, s->ignore_eos)) break;
        n++;
        if (on_piece && on_piece(user, token, piece, piece_len)) break;
    }
    if (n_generated) *n_generated = n;
    return rc;
}

/* ======================================================================== batch */

struct ac_batch {
    const ac_model *model;
    const ac_tokenizer *tok;
    int n_seqs;
    ac_state *state;       /* one KV cache per sequence */
    ac_sampler **samplers; /* (n_seqs) sequence i samples with seed + i */
    int *pos;              /* (n_seqs) positions in each cache */
    int *active;           /* (n_seqs) the sequences of this step's rows, in row order */
    int *row_token;        /* (n_seqs) */
    int ignore_eos;        /* sequences go on past BOS/EOS (ac_batch_set_ignore_eos) */
};

AC_API void ac_batch_free(ac_batch *b) {
    if (!b) return;
    if (b->samplers)
        for (int i = 0; i < b->n_seqs; i++) ac_sampler_free(b->samplers[i]);
    free(b->samplers);
    ac_state_free(b->state);
    free(b->pos);
    free(b->active);
    free(b->row_token);
    free(b);
}

AC_API int ac_batch_create(const ac_model *m, const ac_tokenizer *tok, int n_seqs,
                           const ac_sampler_params *params, ac_batch **out) {
    if (!out) return fail(AC_ERR_ARG, "ac_batch_create: out is NULL");
    *out = NULL;
    if (!m || !tok) return fail(AC_ERR_ARG, "ac_batch_create: model and tokenizer are required");
    if (n_seqs < 1 || n_seqs > AC_MAX_BATCH)
        return fail(AC_ERR_ARG, "batch size %d is invalid: it must be in 1..%d", n_seqs, AC_MAX_BATCH);
    if (tok->vocab_size != m->config.vocab_size)
        return fail(AC_ERR_MISMATCH, "tokenizer has %d pieces but the model's vocab_size is %d",
                    tok->vocab_size, m->config.vocab_size);
    ac_batch *b = calloc(1, sizeof *b);
    if (!b) return fail(AC_ERR_NOMEM, "out of memory for the batch");
    b->model = m;
    b->tok = tok;
    b->n_seqs = n_seqs;
    b->samplers = calloc((size_t)n_seqs, sizeof *b->samplers);
    b->pos = calloc((size_t)n_seqs, sizeof *b->pos);
    b->active = calloc((size_t)n_seqs, sizeof *b->active);
    b->row_token = calloc((size_t)n_seqs, sizeof *b->row_token);
    int rc = (b->samplers && b->pos && b->active && b->row_token)
                 ? state_create(m, n_seqs, &b->state)
                 : fail(AC_ERR_NOMEM, "out of memory for the batch");
    ac_sampler_params p = params ? *params : ac_sampler_default_params();
    for (int i = 0; !rc && i < n_seqs; i++) {
        ac_sampler_params pi = p;
        pi.seed = p.seed + (uint64_t)i;
        rc = ac_sampler_create(&pi, m->config.vocab_size, &b->samplers[i]);
    }
    if (rc) {
        ac_batch_free(b);
        return rc;
    }
    *out = b;
    return AC_OK;
}

AC_API int ac_batch_set_threads(ac_batch *b, int n_threads) {
    if (!b) return fail(AC_ERR_ARG, "ac_batch_set_threads: batch is NULL");
    return ac_state_set_threads(b->state, n_threads);
}

AC_API int ac_batch_set_ignore_eos(ac_batch *b, int ignore) {
    if (!b) return fail(AC_ERR_ARG, "ac_batch_set_ignore_eos: batch is NULL");
    b->ignore_eos = ignore != 0;
    return AC_OK;
}

/* Encodes prompt i with BOS and prefills sequence i with it; its next-token logits go to
 * logits (V floats). */
static int batch_prefill(ac_batch *b, int i, const char *prompt, size_t len, float *logits) {
    if ((!prompt && len > 0) || len > (size_t)INT_MAX / 4)
        return fail(AC_ERR_ARG, "ac_batch_generate: bad prompt %d", i);
    int cap = (int)len + 3, n;
    int *tokens = malloc((size_t)cap * sizeof *tokens);
    if (!tokens) return fail(AC_ERR_NOMEM, "ac_batch_generate: out of memory");
    int rc = ac_encode(b->tok, prompt, len, 1, 0, tokens, cap, &n);
    int seq_len = b->model->config.seq_len;
    if (!rc && n > seq_len)
        rc = fail(AC_ERR_RANGE, "prompt %d is %d tokens (BOS included) but the model's seq_len is %d",
                  i, n, seq_len);
    if (!rc) {
        prefill(b->state, i, tokens, n, 0, logits, 0);
        b->pos[i] = n;
    }
    free(tokens);
    return rc;
}

AC_API int ac_batch_generate(ac_batch *b, const char *const *prompts, const size_t *lens,
                             int max_new_tokens, int *tokens, int *n_generated) {
    if (!b || !prompts || !lens || (max_new_tokens > 0 && !tokens) || !n_generated)
        return fail(AC_ERR_ARG, "ac_batch_generate: bad arguments");
    if (max_new_tokens < 0)
        return fail(AC_ERR_ARG, "max_new_tokens %d is invalid: it must be >= 0", max_new_tokens);
    int n = b->n_seqs, seq_len = b->model->config.seq_len;
    size_t V = (size_t)b->model->config.vocab_size;
    int n_active = 0;
    for (int i = 0; i < n; i++) {
        n_generated[i] = 0;
        int rc = batch_prefill(b, i, prompts[i], lens[i], b->state->logits + (size_t)n_active * V);
        if (rc) return rc;
        /* a sampled token needs a free position, exactly as in ac_session_next */
        if (max_new_tokens > 0 && b->pos[i] < seq_len) b->active[n_active++] = i;
    }
    /* Row r of the logits belongs to sequence active[r]: sample each, drop the sequences
     * that ended, and run the rest one position further, all in one forward pass. */
    while (n_active > 0) {
        int rows = 0;
        for (int r = 0; r < n_active; r++) {
            int i = b->active[r], token;
            int rc = ac_sample(b->samplers[i], b->state->logits + (size_t)r * V, &token);
            if (rc) return rc;
            if (is_stop(token, b->ignore_eos)) continue;
            tokens[(size_t)i * max_new_tokens + n_generated[i]++] = token;
            if (n_generated[i] == max_new_tokens || b->pos[i] + 1 >= seq_len) continue;
            b->active[rows] = i;
            b->row_token[rows] = token;
            b->state->row_seq[rows] = i;
            b->state->row_pos[rows] = b->pos[i]++;
            rows++;
        }
        n_active = rows;
        if (rows > 0) forward_rows(b->state, b->row_token, rows, 0, b->state->logits);
    }
    return AC_OK;
}
