/*
 * model.c - a model file into an immutable ac_model: the header (v0 / v1 / v2 int8 layouts)
 * is parsed and every field checked before anything is sized from it, the file size must be
 * exactly what the header implies, and then each weight array is located inside the file.
 * Also the int8 (v2) image of a float32 model and saving a model.
 *
 * Sections, in order:
 *   config    parsing and validating the header
 *   weights   locating each weight array inside the file
 *   values    refusing weights that are not numbers, or that make every logit the same
 *   model     load from a path (read, or mmap when asked) or from a caller's buffer
 *   quantize  int8 (v2) image of a float32 model, saving a model
 */
#define _GNU_SOURCE
#include "internal.h"

#include "kernels.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

/* ======================================================================== config */

#define MAGIC_V1 0x616b3432u /* "ak42" read as a little-endian uint32 (v1 and v2) */
#define V0_HEADER_BYTES 28   /* seven int32 */
#define V1_HEADER_BYTES 256

/* Decodes the header at data into *c and the header size into *header_bytes.  Checks only
 * what is needed to read it; validate_config() checks the values. */
static int parse_header(const unsigned char *data, size_t size, const char *name, ac_config *c,
                        size_t *header_bytes) {
    if (size < V0_HEADER_BYTES)
        return ac_fail(AC_ERR_FORMAT, "%s: file is %zu bytes, shorter than a model header (%d bytes)",
                       name, size, V0_HEADER_BYTES);
    uint32_t magic;
    memcpy(&magic, data, sizeof magic);
    const unsigned char *params;
    if (magic == MAGIC_V1) {
        if (size < V1_HEADER_BYTES)
            return ac_fail(AC_ERR_FORMAT, "%s: file is %zu bytes, shorter than a v1 header (%d bytes)",
                           name, size, V1_HEADER_BYTES);
        int32_t version = read_i32(data + 4);
        if (version != 1 && version != 2)
            return ac_fail(AC_ERR_FORMAT, "%s: unknown model file version %d (known: 1, 2)", name, version);
        unsigned char shared = data[36];
        if (shared > 1)
            return ac_fail(AC_ERR_FORMAT, "%s: header field shared_classifier is %d, expected 0 or 1",
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
            return ac_fail(AC_ERR_FORMAT, "%s: header field vocab_size is %d, out of range", name, vocab);
        vocab = -vocab;
        c->shared_classifier = 0;
    }
    c->vocab_size = vocab;
    return AC_OK;
}

static int check_field(const char *name, const char *field, int value, int min, int max) {
    if (value <= 0)
        return ac_fail(AC_ERR_FORMAT, "%s: header field %s is %d, must be positive", name, field, value);
    if (value < min)
        return ac_fail(AC_ERR_FORMAT, "%s: header field %s is %d, below the minimum %d", name, field,
                       value, min);
    if (value > max)
        return ac_fail(AC_ERR_FORMAT, "%s: header field %s is %d, above the limit %d", name, field,
                       value, max);
    return AC_OK;
}

/* int8 groups run along matrix rows (dim or hidden_dim values long) and must tile them; a
 * multiple of 4 keeps every tensor's float scales 4-byte aligned in the file. */
static int validate_group_size(const ac_config *c, const char *name) {
    int gs = c->group_size;
    if (gs <= 0 || gs % 4)
        return ac_fail(AC_ERR_FORMAT, "%s: header field group_size is %d, must be a positive multiple of 4",
                       name, gs);
    if (c->dim % gs)
        return ac_fail(AC_ERR_FORMAT, "%s: group_size %d does not divide dim %d", name, gs, c->dim);
    if (c->hidden_dim % gs)
        return ac_fail(AC_ERR_FORMAT, "%s: group_size %d does not divide hidden_dim %d", name, gs,
                       c->hidden_dim);
    return AC_OK;
}

/* Bytes after the last header field are reserved and zero (llama2.c writes zeros): a file
 * with anything there was written by something else, or for a layout this reader does not
 * know, and reading it as v1/v2 would misread it silently. */
static int check_header_padding(const unsigned char *data, const ac_config *c, const char *name) {
    size_t first = c->version == 2 ? 41 : 37; /* after group_size (v2) or shared_classifier */
    for (size_t i = first; i < V1_HEADER_BYTES; i++)
        if (data[i])
            return ac_fail(AC_ERR_FORMAT, "%s: header byte %zu is 0x%02x; bytes %zu..%d of a v%d header "
                           "must be zero", name, i, data[i], first, V1_HEADER_BYTES - 1, c->version);
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
        return ac_fail(AC_ERR_FORMAT, "%s: dim %d is not divisible by n_heads %d", name, c->dim, c->n_heads);
    if (c->n_heads % c->n_kv_heads)
        return ac_fail(AC_ERR_FORMAT, "%s: n_heads %d is not divisible by n_kv_heads %d", name,
                       c->n_heads, c->n_kv_heads);
    if ((c->dim / c->n_heads) % 2)
        return ac_fail(AC_ERR_FORMAT, "%s: head size %d (dim / n_heads) is odd; RoPE needs pairs", name,
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

const ac_layer_matrix_info AC_LAYER_MATRICES[AC_N_LAYER_MATRICES] = {
    {offsetof(ac_layer, wq), 'D', 'D', "wq"}, {offsetof(ac_layer, wk), 'K', 'D', "wk"},
    {offsetof(ac_layer, wv), 'K', 'D', "wv"}, {offsetof(ac_layer, wo), 'D', 'D', "wo"},
    {offsetof(ac_layer, w1), 'H', 'D', "w1"}, {offsetof(ac_layer, w2), 'D', 'H', "w2"},
    {offsetof(ac_layer, w3), 'H', 'D', "w3"},
};

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
    ac_matrix m = {NULL, NULL, NULL, NULL};
    if (!cur->group_size) {
        m.f = take_floats(cur, n);
        return m;
    }
    m.q = (const int8_t *)cur->p;
    cur->p += n;
    m.s = take_floats(cur, n / (uint64_t)cur->group_size);
    return m;
}

/* Takes per-layer matrices i0..i1-1 of the AC_LAYER_MATRICES order. */
static void take_layer_matrices(cursor *cur, ac_weights *w, const ac_config *c, int i0, int i1) {
    for (int i = i0; i < i1; i++) {
        int rows = dim_of(c, AC_LAYER_MATRICES[i].rows), cols = dim_of(c, AC_LAYER_MATRICES[i].cols);
        for (int l = 0; l < c->n_layers; l++) *layer_matrix(&w->layers[l], i) = take_matrix(cur, rows, cols);
    }
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
        take_layer_matrices(&cur, w, c, 4, AC_N_LAYER_MATRICES); /* w1 w2 w3 */
        w->rms_final = take_floats(&cur, D);
        /* the legacy freq_cis_real / freq_cis_imag tables (seq_len x head_size / 2 each):
         * recomputed, skipped */
        take_floats(&cur, (uint64_t)c->seq_len * (D / (uint64_t)c->n_heads));
    } else {
        w->rms_att = take_floats(&cur, L * D);
        w->rms_ffn = take_floats(&cur, L * D);
        w->rms_final = take_floats(&cur, D);
        w->token_embedding = take_matrix(&cur, c->vocab_size, c->dim);
        take_layer_matrices(&cur, w, c, 0, AC_N_LAYER_MATRICES);
    }
    w->wcls = c->shared_classifier ? w->token_embedding : take_matrix(&cur, c->vocab_size, c->dim);
}

/* ======================================================================== values */

/* A tensor's name for messages: "token_embedding", "layers.3.wq", ... */
typedef char tensor_name[48];

static int non_finite_value(const char *file, const char *tensor, const float *x, size_t n,
                            size_t cols) {
    size_t i = first_non_finite(x, n);
    if (i == n) return AC_OK;
    if (cols == 0)
        return ac_fail(AC_ERR_FORMAT, "%s: %s[%zu] is %g, not a finite number", file, tensor, i,
                       shown_value(x[i]));
    return ac_fail(AC_ERR_FORMAT, "%s: %s[%zu] (row %zu, column %zu) is %g, not a finite number", file,
                   tensor, i, i / cols, i % cols, shown_value(x[i]));
}

/* int8 scales must be finite and >= 0 (the quantizer writes max|w| / 127), and 0 only for a
 * group whose values are all 0 (which the quantizer writes for an all-zero group): a zero
 * scale over non-zero values, or a negative one, is no quantizer's output. */
static int bad_scales(const char *file, const char *tensor, const ac_matrix *m, size_t n, int gs) {
    size_t groups = n / (size_t)gs;
    for (size_t g = 0; g < groups; g++) {
        float s = m->s[g];
        if (s > 0.0f && s <= FLT_MAX) continue;
        if (!(s == 0.0f))
            return ac_fail(AC_ERR_FORMAT, "%s: %s scale[%zu] is %g; int8 scales must be finite and >= 0",
                           file, tensor, g, shown_value(s));
        for (size_t j = g * (size_t)gs; j < (g + 1) * (size_t)gs; j++)
            if (m->q[j])
                return ac_fail(AC_ERR_FORMAT, "%s: %s scale[%zu] is 0 but %s[%zu] is %d; a zero scale is "
                               "only written for an all-zero group", file, tensor, g, tensor, j, m->q[j]);
    }
    return AC_OK;
}

static int check_matrix(const char *file, const char *tensor, const ac_matrix *m, int rows, int cols,
                        int gs) {
    size_t n = (size_t)rows * (size_t)cols;
    return m->f ? non_finite_value(file, tensor, m->f, n, (size_t)cols) : bad_scales(file, tensor, m, n, gs);
}

static int all_zero(const ac_matrix *m, size_t n) {
    int nonzero = 0;
    if (m->f)
        for (size_t i = 0; i < n; i++) nonzero |= m->f[i] != 0.0f;
    else
        for (size_t i = 0; i < n; i++) nonzero |= m->q[i] != 0;
    return !nonzero;
}

/* A tensor that alone decides that every token gets the same logits, whatever the input: the
 * embedding (every residual stream is 0), rms_final (every logit is 0) and a separate
 * classifier.  Per-layer tensors may be all zero: that layer's sublayer adds nothing, which
 * is a working (if pruned) model. */
static int degenerate_tensor(const char *file, const ac_weights *w, const ac_config *c) {
    size_t D = (size_t)c->dim, VD = (size_t)c->vocab_size * D;
    const ac_matrix rms_final = {w->rms_final, NULL, NULL, NULL};
    const char *what = all_zero(&w->token_embedding, VD) ? "token_embedding"
                       : all_zero(&rms_final, D)           ? "rms_final"
                       : !c->shared_classifier && all_zero(&w->wcls, VD) ? "wcls"
                                                                          : NULL;
    if (!what) return AC_OK;
    return ac_fail(AC_ERR_FORMAT, "%s: %s is all zeros: every token would get the same logits", file,
                   what);
}

/* Every weight is a finite number (NaN or an infinity anywhere makes the logits NaN, and
 * sampling from those is meaningless), int8 scales are well formed, and the model is not
 * degenerate.  file names the model in messages.  The legacy v0 RoPE tables are not read
 * (they are recomputed), so they are not checked. */
static int check_weights(const ac_weights *w, const ac_config *c, const char *file) {
    int D = c->dim, gs = c->group_size, rc;
    tensor_name name;
    if ((rc = check_matrix(file, "token_embedding", &w->token_embedding, c->vocab_size, D, gs))) return rc;
    for (int l = 0; l < c->n_layers; l++) {
        snprintf(name, sizeof name, "layers.%d.rms_att", l);
        if ((rc = non_finite_value(file, name, w->rms_att + (size_t)l * D, (size_t)D, 0))) return rc;
        snprintf(name, sizeof name, "layers.%d.rms_ffn", l);
        if ((rc = non_finite_value(file, name, w->rms_ffn + (size_t)l * D, (size_t)D, 0))) return rc;
        for (int i = 0; i < AC_N_LAYER_MATRICES; i++) {
            snprintf(name, sizeof name, "layers.%d.%s", l, AC_LAYER_MATRICES[i].name);
            if ((rc = check_matrix(file, name, layer_matrix(&w->layers[l], i),
                                   dim_of(c, AC_LAYER_MATRICES[i].rows), dim_of(c, AC_LAYER_MATRICES[i].cols),
                                   gs)))
                return rc;
        }
    }
    if ((rc = non_finite_value(file, "rms_final", w->rms_final, (size_t)D, 0))) return rc;
    if (!c->shared_classifier && (rc = check_matrix(file, "wcls", &w->wcls, c->vocab_size, D, gs))) return rc;
    return degenerate_tensor(file, w, c);
}

/* ======================================================================== model */

/* The file must hold exactly the weights its (valid) header describes. */
static int check_file_size(const ac_config *c, size_t header_bytes, size_t size, const char *name) {
    uint64_t expected = expected_file_bytes(c, header_bytes);
    if (expected == 0)
        return ac_fail(AC_ERR_FORMAT, "%s: header sizes overflow 64-bit arithmetic", name);
    if (expected != (uint64_t)size)
        return ac_fail(AC_ERR_FORMAT,
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

/* Everything the header of a size-byte file says, checked: its fields, the file size they
 * imply and the reserved bytes.  data holds at least the header's bytes (all of them that
 * the file has, up to V1_HEADER_BYTES), so a file can be checked before it is read. */
static int check_header(const unsigned char *data, size_t size, const char *name, ac_config *c,
                        size_t *header_bytes) {
    int rc = parse_header(data, size, name, c, header_bytes);
    if (rc) return rc;
    if (!(rc = validate_config(c, name))) rc = check_file_size(c, *header_bytes, size, name);
    if (rc && c->version == 0) ac_append_error(V0_HINT);
    if (!rc && c->version != 0) rc = check_header_padding(data, c, name);
    return rc;
}

/* The int8 matrices of m that are multiplied (every layer's and the classifier, also when it
 * shares the embedding's weights: the embedding's lookups keep reading the rows), with their
 * shapes. */
typedef struct {
    ac_matrix *m;
    int rows, cols;
    size_t packed_bytes; /* in the kernel set's layout (0: the matrix stays in the row layout) */
} int8_matrix;

static int int8_matrices(ac_model *m, int8_matrix *list) {
    const ac_config *c = &m->config;
    int count = 0;
    for (int l = 0; l < c->n_layers; l++)
        for (int i = 0; i < AC_N_LAYER_MATRICES; i++)
            list[count++] = (int8_matrix){layer_matrix(&m->w.layers[l], i), dim_of(c, AC_LAYER_MATRICES[i].rows),
                                          dim_of(c, AC_LAYER_MATRICES[i].cols), 0};
    list[count++] = (int8_matrix){&m->w.wcls, c->vocab_size, c->dim, 0};
    return count;
}

/* Packs m's int8 matrices for the kernel set that will multiply them, if it packs (kernels.h):
 * once, here, so that every state and thread shares them. */
static int pack_int8(ac_model *m, const char *name) {
    const ac_kernels *k = ac_kernels_get();
    int gs = m->config.group_size;
    if (gs == 0 || !k->packed_q8_bytes) return AC_OK;
    int8_matrix *list = calloc((size_t)m->config.n_layers * AC_N_LAYER_MATRICES + 1, sizeof *list);
    if (!list) return ac_fail(AC_ERR_NOMEM, "%s: out of memory packing the int8 matrices", name);
    int count = int8_matrices(m, list);
    size_t total = 0;
    for (int i = 0; i < count; i++) {
        list[i].packed_bytes = k->packed_q8_bytes(list[i].rows, list[i].cols, gs);
        total += list[i].packed_bytes;
    }
    if (total) m->packed = ac_alloc_model_image(total); /* every token reads it whole: huge pages */
    if (total && !m->packed) {
        free(list);
        return ac_fail(AC_ERR_NOMEM, "%s: out of memory packing the int8 matrices (%zu bytes)", name, total);
    }
    unsigned char *at = m->packed;
    for (int i = 0; i < count; i++) {
        if (!list[i].packed_bytes) continue;
        k->pack_q8(at, list[i].m->q, list[i].m->s, list[i].rows, list[i].cols, gs);
        list[i].m->packed = at;
        at += list[i].packed_bytes;
    }
    free(list);
    return AC_OK;
}

int ac_model_from_bytes(const void *data, size_t size, const char *name, ac_model **out) {
    const unsigned char *bytes = data;
    ac_config c;
    size_t header_bytes = 0;
    int rc = check_header(bytes, size, name, &c, &header_bytes);
    if (rc) return rc;
    ac_model *m = calloc(1, sizeof *m);
    if (m) m->w.layers = calloc((size_t)c.n_layers, sizeof *m->w.layers);
    if (!m || !m->w.layers) {
        free(m);
        return ac_fail(AC_ERR_NOMEM, "%s: out of memory for the model handle", name);
    }
    m->config = c;
    m->data = data;
    m->size = size;
    map_weights(&m->w, &c, bytes + header_bytes);
    if ((rc = check_weights(&m->w, &c, name)) || (rc = pack_int8(m, name))) {
        ac_model_free(m); /* neither mapped nor owned yet: the caller keeps data */
        return rc;
    }
    *out = m;
    return AC_OK;
}

AC_API int ac_model_load_memory(const void *data, size_t size, const char *name, ac_model **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_model_load_memory: out is NULL");
    *out = NULL;
    if (!name) name = "<memory>";
    if (!data && size) return ac_fail(AC_ERR_ARG, "%s: data is NULL but size is %zu", name, size);
    static const uint32_t no_bytes = 0;
    if (!data) data = &no_bytes; /* size 0 (aligned): parse_header reports the short file */
    if ((uintptr_t)data % sizeof(float))
        return ac_fail(AC_ERR_ARG, "%s: the model buffer must be 4-byte aligned", name);
    return ac_model_from_bytes(data, size, name, out);
}

AC_API ac_model_load_params ac_model_default_load_params(void) {
    ac_model_load_params p = {0};
    return p;
}

/* The header of the open file checked before the weights are read or mapped: a file that is
 * not a model, or whose size disagrees with its header, costs no read of the whole file. */
static int check_file_header(int fd, size_t size, const char *path) {
    unsigned char header[V1_HEADER_BYTES];
    size_t n = size < sizeof header ? size : sizeof header;
    int rc = ac_read_fully(fd, header, n, path, "model");
    if (rc) return rc;
    ac_config c;
    size_t header_bytes = 0;
    return check_header(header, size, path, &c, &header_bytes);
}

/* Images of 2 MiB and more start on a 2 MiB boundary and ask for transparent huge pages
 * (which Linux then gives whether its policy is "always" or "madvise"): every token reads every
 * weight, and in 4 KiB pages the 28.6 MB persona spans 7,000 pages, more than the TLB holds;
 * in 2 MiB pages it spans 14, and loading faults 14 times instead of 7,000 (measured: README
 * "Reading or mapping").  Smaller images are 64-byte aligned like a mapping's start (the kernels
 * need only 4). */
void *ac_alloc_model_image(size_t size) {
    const size_t huge_page = (size_t)2 << 20;
    void *data = NULL;
    if (posix_memalign(&data, size >= huge_page ? huge_page : 64, size) != 0) return NULL;
#ifdef MADV_HUGEPAGE
    if (size >= huge_page) madvise(data, size, MADV_HUGEPAGE); /* advice: failing it changes nothing */
#endif
    return data;
}

/* The whole file in private memory. */
static int read_model_file(int fd, size_t size, const char *path, void **out) {
    void *data = ac_alloc_model_image(size);
    if (!data) return ac_fail(AC_ERR_NOMEM, "%s: out of memory for the %zu-byte model file", path, size);
    int rc = ac_read_fully(fd, data, size, path, "model");
    if (rc) {
        free(data);
        return rc;
    }
    *out = data;
    return AC_OK;
}

static int map_model_file(int fd, size_t size, const char *path, void **out) {
    void *data = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (data == MAP_FAILED) return ac_fail(AC_ERR_IO, "%s: cannot mmap model file: %s", path, strerror(errno));
    *out = data;
    return AC_OK;
}

AC_API int ac_model_load_file(const char *path, const ac_model_load_params *params, ac_model **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_model_load_file: out is NULL");
    *out = NULL;
    if (!path) return ac_fail(AC_ERR_ARG, "ac_model_load_file: path is NULL");
    int use_mmap = params ? params->use_mmap != 0 : ac_model_default_load_params().use_mmap;
    int fd;
    size_t size;
    int rc = ac_open_regular_file(path, "model", &fd, &size);
    if (rc) return rc;
    void *data = NULL;
    if (!(rc = check_file_header(fd, size, path)) && lseek(fd, 0, SEEK_SET) != 0)
        rc = ac_fail(AC_ERR_IO, "%s: cannot seek in the model file: %s", path, strerror(errno));
    if (!rc) rc = use_mmap ? map_model_file(fd, size, path, &data) : read_model_file(fd, size, path, &data);
    close(fd); /* a mapping keeps the file alive */
    if (rc) return rc;
    /* checked again on the bytes in memory: the file may have changed since its header was */
    rc = ac_model_from_bytes(data, size, path, out);
    if (rc) {
        if (use_mmap) munmap(data, size);
        else free(data);
        return rc;
    }
    (*out)->mapped = use_mmap;
    (*out)->owned = !use_mmap;
    return AC_OK;
}

AC_API int ac_model_load(const char *path, ac_model **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_model_load: out is NULL");
    if (!path) {
        *out = NULL;
        return ac_fail(AC_ERR_ARG, "ac_model_load: path is NULL");
    }
    return ac_model_load_file(path, NULL, out);
}

AC_API void ac_model_free(ac_model *m) {
    if (!m) return;
    if (m->mapped) munmap((void *)m->data, m->size);
    if (m->owned) free((void *)m->data);
    free(m->packed);
    free(m->w.layers);
    free(m);
}

AC_API int ac_model_config(const ac_model *m, ac_config *out) {
    if (!m || !out) return ac_fail(AC_ERR_ARG, "ac_model_config: NULL argument");
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
    for (int i = 0; i < AC_N_LAYER_MATRICES; i++) {
        int rows = dim_of(c, AC_LAYER_MATRICES[i].rows), cols = dim_of(c, AC_LAYER_MATRICES[i].cols);
        for (int l = 0; l < L; l++) p = put_quantized(p, layer_matrix(&w->layers[l], i)->f, rows, cols, gs);
    }
    if (!c->shared_classifier) put_quantized(p, w->wcls.f, V, D, gs);
}

AC_API int ac_model_quantize(const ac_model *src, int group_size, ac_model **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_model_quantize: out is NULL");
    *out = NULL;
    if (!src) return ac_fail(AC_ERR_ARG, "ac_model_quantize: model is NULL");
    if (src->config.group_size)
        return ac_fail(AC_ERR_ARG, "the model is already int8 (group size %d)", src->config.group_size);
    /* src was checked at load, but a borrowed buffer may have changed since; the quantizer
     * would turn a NaN into 0 without a trace */
    int rc = check_weights(&src->w, &src->config, "int8 quantization of the source model");
    if (rc) return rc;
    if (group_size < 0 || group_size % 4)
        return ac_fail(AC_ERR_ARG, "ac_model_quantize: argument group_size is %d, must be 0 (the default, %d) or a "
                       "positive multiple of 4", group_size, AC_DEFAULT_GROUP_SIZE);
    ac_config c = src->config;
    c.version = 2;
    c.group_size = group_size ? group_size : AC_DEFAULT_GROUP_SIZE;
    if (validate_config(&c, "int8 quantization")) return AC_ERR_ARG; /* its message stays */
    uint64_t bytes = expected_file_bytes(&c, V1_HEADER_BYTES);
    void *img = bytes == 0 || bytes > SIZE_MAX ? NULL : ac_alloc_model_image((size_t)bytes);
    if (!img)
        return ac_fail(AC_ERR_NOMEM, "out of memory for the int8 model (%llu bytes)",
                       (unsigned long long)bytes);
    write_v2_image(img, src, &c);
    rc = ac_model_from_bytes(img, (size_t)bytes, "int8 quantization", out);
    if (rc) {
        /* src passed every check, so the one format check the image can fail is the
         * degenerate tensor: values so small that every group's scale (its largest |value| /
         * 127) underflows to 0 and the tensor becomes all zeros.  Other failures (out of
         * memory) keep their code. */
        free(img);
        if (rc != AC_ERR_FORMAT) return rc;
        ac_append_error(" (once quantized: its float32 values are too small for int8 scales)");
        return AC_ERR_NUMERIC;
    }
    (*out)->owned = 1;
    return AC_OK;
}

AC_API int ac_model_save(const ac_model *m, const char *path) {
    if (!m || !path) return ac_fail(AC_ERR_ARG, "ac_model_save: NULL argument");
    /* Written next to path, then renamed over it: path may be the file m is mapped from. */
    size_t len = strlen(path);
    char *tmp = malloc(len + 5);
    if (!tmp) return ac_fail(AC_ERR_NOMEM, "ac_model_save: out of memory");
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
    if (!ok) return ac_fail(AC_ERR_IO, "%s: cannot write the model file: %s", path, strerror(e));
    return AC_OK;
}

