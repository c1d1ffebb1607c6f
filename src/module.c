/*
 * module.c - knowledge modules: low-rank adapters kept in their own files and merged into a
 * private copy of a base model's weights, so the base file is never written.
 *
 * A module holds, for some matrices W of some layers, two float32 matrices A (rank x in) and
 * B (out x rank); applied at scale s it turns W into W + s * (alpha / rank) * B A.  It also
 * records the base it was trained on (its header fields and a BLAKE2b fingerprint of the whole
 * base file), so a module for another base is refused instead of silently producing noise.
 *
 * Why merge instead of adding B (A x) at run time: merged, a model with modules runs at exactly
 * the base's speed through the same kernels (prefill, batches, int8 quantization afterwards);
 * the cost is a one-time copy of the weights at load (README "Modules" has the measurements).
 *
 * File layout (little-endian):
 *   0    char[4]   magic "aklm"
 *   4    int32     version, 1
 *   8    int32     rank, 1..AC_MAX_MODULE_RANK
 *   12   float32   alpha (finite, > 0)
 *   16   int32     dtype: 0 = float32 A and B (the only one)
 *   20   int32[7]  the base's dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
 *   48   int32     n_targets, 1..n_layers * 7
 *   52   uint8[32] the base's fingerprint: BLAKE2b-256 of the base model file
 *   84   zeros up to byte 128
 *   128  n_targets x (int32 layer, int32 matrix), strictly increasing by (layer, matrix);
 *        matrix 0..6 = wq wk wv wo w1 w2 w3
 *   then for each target in that order: A (rank x in), then B (out x rank), float32 row-major
 */
#define _GNU_SOURCE
#include "internal.h"

#include "blake2b.h"

#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MODULE_MAGIC "aklm"
#define MODULE_VERSION 1
#define MODULE_HEADER_BYTES 128
#define MODULE_PAD_START 84
#define TARGET_ENTRY_BYTES 8
#define N_BASE_FIELDS 7

_Static_assert(AC_FINGERPRINT_BYTES == BLAKE2B_256_BYTES, "a fingerprint is a BLAKE2b-256 digest");

static const char *const BASE_FIELDS[N_BASE_FIELDS] = {"dim", "hidden_dim", "n_layers", "n_heads",
                                                       "n_kv_heads", "vocab_size", "seq_len"};

/* One adapted matrix: W (rows x cols) of layer `layer` gains B A, B (rows x rank), A (rank x cols). */
typedef struct {
    int layer, matrix;
    int rows, cols;
    const float *a, *b;
} module_target;

struct ac_module {
    char *name;            /* for messages */
    int rank;
    float alpha;
    ac_config base;        /* the base's shape; version, shared_classifier, group_size are 0 */
    unsigned char fingerprint[AC_FINGERPRINT_BYTES];
    int n_targets;
    module_target *targets;
    unsigned char *bytes;  /* the whole file, owned; the targets' a and b point into it */
};

/* ======================================================================== load */

static int base_field(const ac_config *c, int i) {
    const int v[N_BASE_FIELDS] = {c->dim, c->hidden_dim, c->n_layers, c->n_heads,
                                  c->n_kv_heads, c->vocab_size, c->seq_len};
    return v[i];
}

/* Enough of the base's shape to size the file in safe arithmetic.  Whether it is a valid
 * model's shape is settled at apply time: it must equal the (validated) model's. */
static int check_shape(const ac_config *c, const char *name) {
    int maxima[N_BASE_FIELDS] = {AC_MAX_DIM, AC_MAX_HIDDEN_DIM, AC_MAX_LAYERS, c->dim, c->n_heads,
                                 AC_MAX_VOCAB, AC_MAX_SEQ_LEN};
    for (int i = 0; i < N_BASE_FIELDS; i++)
        if (base_field(c, i) < 1 || base_field(c, i) > maxima[i])
            return ac_fail(AC_ERR_FORMAT, "%s: base %s is %d, must be in 1..%d", name, BASE_FIELDS[i],
                           base_field(c, i), maxima[i]);
    return AC_OK;
}

/* Magic, version, rank, alpha, dtype, the base's shape, n_targets and the zero padding. */
static int parse_module_header(ac_module *m, const unsigned char *p, size_t size) {
    const char *name = m->name;
    int rc;
    if (size < MODULE_HEADER_BYTES)
        return ac_fail(AC_ERR_FORMAT, "%s: file is %zu bytes, shorter than a module header (%d bytes)",
                       name, size, MODULE_HEADER_BYTES);
    if (memcmp(p, MODULE_MAGIC, 4) != 0) {
        uint32_t magic;
        memcpy(&magic, p, sizeof magic);
        return ac_fail(AC_ERR_FORMAT, "%s: magic is 0x%08x, not \"%s\": not a module file", name, magic,
                       MODULE_MAGIC);
    }
    int version = read_i32(p + 4);
    if (version != MODULE_VERSION)
        return ac_fail(AC_ERR_FORMAT, "%s: version is %d, expected %d", name, version, MODULE_VERSION);
    m->rank = read_i32(p + 8);
    if (m->rank < 1 || m->rank > AC_MAX_MODULE_RANK)
        return ac_fail(AC_ERR_FORMAT, "%s: rank is %d, must be in 1..%d", name, m->rank, AC_MAX_MODULE_RANK);
    m->alpha = read_f32(p + 12);
    if (!isfinite(m->alpha) || m->alpha <= 0)
        return ac_fail(AC_ERR_FORMAT, "%s: alpha is %g, must be finite and > 0", name, (double)m->alpha);
    int dtype = read_i32(p + 16);
    if (dtype != 0)
        return ac_fail(AC_ERR_FORMAT, "%s: dtype is %d, expected 0 (float32)", name, dtype);
    int *fields[N_BASE_FIELDS] = {&m->base.dim, &m->base.hidden_dim, &m->base.n_layers,
                                  &m->base.n_heads, &m->base.n_kv_heads, &m->base.vocab_size,
                                  &m->base.seq_len};
    for (int i = 0; i < N_BASE_FIELDS; i++) *fields[i] = read_i32(p + 20 + 4 * i);
    if ((rc = check_shape(&m->base, name))) return rc;
    m->n_targets = read_i32(p + 48);
    int max_targets = m->base.n_layers * AC_N_LAYER_MATRICES;
    if (m->n_targets < 1 || m->n_targets > max_targets)
        return ac_fail(AC_ERR_FORMAT, "%s: n_targets is %d, must be in 1..%d (n_layers x 7)", name,
                       m->n_targets, max_targets);
    memcpy(m->fingerprint, p + 52, AC_FINGERPRINT_BYTES);
    for (int i = MODULE_PAD_START; i < MODULE_HEADER_BYTES; i++)
        if (p[i] != 0)
            return ac_fail(AC_ERR_FORMAT, "%s: header byte %d is %d; bytes %d..%d must be zero", name, i,
                           p[i], MODULE_PAD_START, MODULE_HEADER_BYTES - 1);
    return AC_OK;
}

/* The target table: each (layer, matrix) in range, strictly increasing; then the exact file
 * size those targets imply, and the a/b pointers. */
static int parse_targets(ac_module *m, const unsigned char *p, size_t size) {
    const char *name = m->name;
    uint64_t table_end = MODULE_HEADER_BYTES + (uint64_t)m->n_targets * TARGET_ENTRY_BYTES;
    if (size < table_end)
        return ac_fail(AC_ERR_FORMAT, "%s: file is %zu bytes, too short for its %d-entry target table "
                       "(ends at byte %llu)", name, size, m->n_targets, (unsigned long long)table_end);
    m->targets = calloc((size_t)m->n_targets, sizeof *m->targets);
    if (!m->targets) return ac_fail(AC_ERR_NOMEM, "%s: out of memory for the target table", name);
    uint64_t total = table_end, floats, bytes;
    int prev_key = -1;
    for (int i = 0; i < m->n_targets; i++) {
        module_target *t = &m->targets[i];
        const unsigned char *e = p + MODULE_HEADER_BYTES + (size_t)i * TARGET_ENTRY_BYTES;
        t->layer = read_i32(e);
        t->matrix = read_i32(e + 4);
        if (t->layer < 0 || t->layer >= m->base.n_layers)
            return ac_fail(AC_ERR_FORMAT, "%s: target %d: layer is %d, must be in 0..%d", name, i, t->layer,
                           m->base.n_layers - 1);
        if (t->matrix < 0 || t->matrix >= AC_N_LAYER_MATRICES)
            return ac_fail(AC_ERR_FORMAT, "%s: target %d: matrix is %d, must be in 0..6 "
                           "(wq wk wv wo w1 w2 w3)", name, i, t->matrix);
        int key = t->layer * AC_N_LAYER_MATRICES + t->matrix;
        if (key <= prev_key)
            return ac_fail(AC_ERR_FORMAT, "%s: target %d (layers.%d.%s) is out of order or repeated: targets "
                           "must be strictly increasing by (layer, matrix)", name, i, t->layer,
                           AC_LAYER_MATRICES[t->matrix].name);
        prev_key = key;
        t->rows = dim_of(&m->base, AC_LAYER_MATRICES[t->matrix].rows);
        t->cols = dim_of(&m->base, AC_LAYER_MATRICES[t->matrix].cols);
        if (!mul_ok((uint64_t)m->rank, (uint64_t)t->rows + (uint64_t)t->cols, &floats) ||
            !mul_ok(floats, sizeof(float), &bytes) || !add_ok(total, bytes, &total))
            return ac_fail(AC_ERR_FORMAT, "%s: target sizes overflow 64-bit arithmetic", name);
    }
    if (total != (uint64_t)size)
        return ac_fail(AC_ERR_FORMAT, "%s: file is %zu bytes, its header implies %llu (rank %d, %d "
                       "targets of a base with dim %d, hidden_dim %d, kv_dim %d)", name, size,
                       (unsigned long long)total, m->rank, m->n_targets, m->base.dim, m->base.hidden_dim,
                       dim_of(&m->base, 'K'));
    const float *f = (const float *)(p + table_end); /* 4-aligned: the buffer is malloc'd */
    for (int i = 0; i < m->n_targets; i++) {
        module_target *t = &m->targets[i];
        t->a = f;
        f += (size_t)m->rank * (size_t)t->cols;
        t->b = f;
        f += (size_t)t->rows * (size_t)m->rank;
    }
    return AC_OK;
}

/* A and B of every target must be numbers: one NaN would spread through the whole model. */
static int check_finite(const ac_module *m) {
    for (int i = 0; i < m->n_targets; i++) {
        const module_target *t = &m->targets[i];
        const float *arrays[2] = {t->a, t->b};
        size_t counts[2] = {(size_t)m->rank * (size_t)t->cols, (size_t)t->rows * (size_t)m->rank};
        for (int which = 0; which < 2; which++)
            for (size_t j = 0; j < counts[which]; j++)
                if (!isfinite(arrays[which][j]))
                    return ac_fail(AC_ERR_FORMAT, "%s: layers.%d.%s.%c[%zu] is %g, not a finite number",
                                   m->name, t->layer, AC_LAYER_MATRICES[t->matrix].name, which ? 'B' : 'A', j,
                                   (double)arrays[which][j]);
    }
    return AC_OK;
}

/* Takes ownership of bytes (malloc'd, size bytes) and validates them as a module. */
static int module_from_bytes(unsigned char *bytes, size_t size, const char *name, ac_module **out) {
    ac_module *m = calloc(1, sizeof *m);
    if (m) m->name = strdup(name);
    if (!m || !m->name) {
        free(m);
        free(bytes);
        return ac_fail(AC_ERR_NOMEM, "%s: out of memory for the module handle", name);
    }
    m->bytes = bytes;
    int rc = parse_module_header(m, bytes, size);
    if (!rc) rc = parse_targets(m, bytes, size);
    if (!rc) rc = check_finite(m);
    if (rc) {
        ac_module_free(m);
        return rc;
    }
    *out = m;
    return AC_OK;
}

AC_API int ac_module_load_memory(const void *data, size_t size, const char *name, ac_module **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_module_load_memory: out is NULL");
    *out = NULL;
    if (!name) name = "<memory>";
    if (!data && size) return ac_fail(AC_ERR_ARG, "%s: data is NULL but size is %zu", name, size);
    unsigned char *copy = malloc(size ? size : 1);
    if (!copy) return ac_fail(AC_ERR_NOMEM, "%s: out of memory for %zu module bytes", name, size);
    if (size) memcpy(copy, data, size);
    return module_from_bytes(copy, size, name, out);
}

/* The text is a finite float32 number, written out whole (no leading space, nothing after it). */
static int whole_float(const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || isspace((unsigned char)s[0]) || !isfinite(v) || errno == ERANGE || fabs(v) > FLT_MAX ||
        (v != 0.0 && fabs(v) < FLT_MIN))
        return 0;
    *out = v;
    return 1;
}

AC_API int ac_module_spec(const char *spec, size_t *path_len, float *scale) {
    if (!spec || !path_len || !scale) return ac_fail(AC_ERR_ARG, "ac_module_spec: NULL argument");
    const char *colon = strrchr(spec, ':');
    double v = 1.0;
    *path_len = colon && colon > spec && whole_float(colon + 1, &v) ? (size_t)(colon - spec) : strlen(spec);
    *scale = (float)v;
    return AC_OK;
}

AC_API int ac_module_load(const char *path, ac_module **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_module_load: out is NULL");
    *out = NULL;
    if (!path) return ac_fail(AC_ERR_ARG, "ac_module_load: path is NULL");
    int fd;
    size_t size;
    int rc = ac_open_regular_file(path, "module", &fd, &size);
    if (rc) return rc;
    unsigned char *bytes = malloc(size ? size : 1);
    if (!bytes) rc = ac_fail(AC_ERR_NOMEM, "%s: out of memory for %zu module bytes", path, size);
    if (!rc) rc = ac_read_fully(fd, bytes, size, path, "module");
    close(fd);
    if (rc) {
        free(bytes);
        return rc;
    }
    return module_from_bytes(bytes, size, path, out);
}

AC_API void ac_module_free(ac_module *m) {
    if (!m) return;
    free(m->targets);
    free(m->bytes);
    free(m->name);
    free(m);
}

AC_API int ac_module_get_info(const ac_module *m, ac_module_info *out) {
    if (!m || !out) return ac_fail(AC_ERR_ARG, "ac_module_get_info: NULL argument");
    memset(out, 0, sizeof *out);
    out->rank = m->rank;
    out->alpha = m->alpha;
    out->n_targets = m->n_targets;
    out->base = m->base;
    for (int i = 0; i < m->n_targets; i++)
        out->n_params += (uint64_t)m->rank * (uint64_t)(m->targets[i].rows + m->targets[i].cols);
    memcpy(out->base_fingerprint, m->fingerprint, AC_FINGERPRINT_BYTES);
    return AC_OK;
}

AC_API int ac_model_fingerprint(const ac_model *model, unsigned char out[AC_FINGERPRINT_BYTES]) {
    if (!model || !out) return ac_fail(AC_ERR_ARG, "ac_model_fingerprint: NULL argument");
    ac_blake2b_256(model->data, model->size, out);
    return AC_OK;
}

/* ======================================================================== apply */

static void hex_prefix(const unsigned char *fp, char out[17]) {
    for (int i = 0; i < 8; i++) snprintf(out + 2 * i, 3, "%02x", fp[i]);
}

/* The module was trained on this base: same shape, same fingerprint. */
static int check_base(const ac_module *m, const ac_config *c, const unsigned char *fingerprint) {
    for (int i = 0; i < N_BASE_FIELDS; i++)
        if (base_field(&m->base, i) != base_field(c, i))
            return ac_fail(AC_ERR_MISMATCH, "%s: the module's base has %s %d, the model has %s %d", m->name,
                           BASE_FIELDS[i], base_field(&m->base, i), BASE_FIELDS[i], base_field(c, i));
    if (memcmp(m->fingerprint, fingerprint, AC_FINGERPRINT_BYTES) != 0) {
        char want[17], have[17];
        hex_prefix(m->fingerprint, want);
        hex_prefix(fingerprint, have);
        return ac_fail(AC_ERR_MISMATCH, "%s: base fingerprint %s... is not the model's (%s...): the module "
                       "was trained on another base model file", m->name, want, have);
    }
    return AC_OK;
}

static int check_apply_args(const ac_model *base, const ac_module *const *modules, const float *scales,
                            int n_modules) {
    if (!base) return ac_fail(AC_ERR_ARG, "ac_model_apply_modules: model is NULL");
    if (n_modules < 0 || n_modules > AC_MAX_MODULES)
        return ac_fail(AC_ERR_ARG, "ac_model_apply_modules: n_modules is %d, must be in 0..%d", n_modules,
                       AC_MAX_MODULES);
    if (n_modules > 0 && (!modules || !scales))
        return ac_fail(AC_ERR_ARG, "ac_model_apply_modules: modules or scales is NULL");
    for (int i = 0; i < n_modules; i++) {
        if (!modules[i]) return ac_fail(AC_ERR_ARG, "ac_model_apply_modules: module %d is NULL", i);
        if (!isfinite(scales[i]))
            return ac_fail(AC_ERR_ARG, "%s: scale %g is not a finite number", modules[i]->name,
                           (double)scales[i]);
    }
    if (base->config.group_size)
        return ac_fail(AC_ERR_ARG, "the model is int8 (group size %d): modules apply to float32 weights, so "
                       "apply them first and quantize the result", base->config.group_size);
    return AC_OK;
}

/* One matrix's adapters: the module's target and its coefficient scale * alpha / rank. */
typedef struct {
    const module_target *t;
    int rank;
    double coef;
} adapter;

/* W (in place, rows x cols) += sum over adapters of coef * B A, summed in double per row and
 * rounded to float once, so the result does not depend on the order of the modules. */
static int merge_matrix(float *w, int rows, int cols, const adapter *ad, int n_ad, double *acc,
                        const char *what) {
    for (int r = 0; r < rows; r++) {
        float *row = w + (size_t)r * cols;
        for (int j = 0; j < cols; j++) acc[j] = row[j];
        for (int m = 0; m < n_ad; m++) {
            const float *b = ad[m].t->b + (size_t)r * ad[m].rank;
            for (int k = 0; k < ad[m].rank; k++) {
                double c = ad[m].coef * b[k];
                const float *a = ad[m].t->a + (size_t)k * cols;
                for (int j = 0; j < cols; j++) acc[j] += c * a[j];
            }
        }
        for (int j = 0; j < cols; j++) {
            row[j] = (float)acc[j];
            if (!isfinite(row[j]))
                return ac_fail(AC_ERR_RANGE, "%s[%d][%d] becomes %g with the modules at these scales",
                               what, r, j, (double)row[j]);
        }
    }
    return AC_OK;
}

/* Merges every module into m's weights (m owns its image, so they may be written).  Each
 * module's targets are sorted, so one cursor per module walks them in (layer, matrix) order. */
static int merge_modules(ac_model *m, const ac_module *const *modules, const float *scales, int n) {
    const ac_config *c = &m->config;
    int cursor[AC_MAX_MODULES] = {0};
    adapter ad[AC_MAX_MODULES];
    double *acc = malloc(sizeof(double) * (size_t)(c->dim > c->hidden_dim ? c->dim : c->hidden_dim));
    if (!acc) return ac_fail(AC_ERR_NOMEM, "out of memory merging modules");
    int rc = AC_OK;
    for (int l = 0; l < c->n_layers && !rc; l++)
        for (int i = 0; i < AC_N_LAYER_MATRICES && !rc; i++) {
            int n_ad = 0;
            for (int k = 0; k < n; k++) {
                const ac_module *mod = modules[k];
                if (cursor[k] >= mod->n_targets) continue;
                const module_target *t = &mod->targets[cursor[k]];
                if (t->layer != l || t->matrix != i) continue;
                cursor[k]++;
                if (scales[k] == 0) continue; /* scale 0 leaves the base's bits untouched */
                ad[n_ad++] = (adapter){t, mod->rank, (double)scales[k] * mod->alpha / mod->rank};
            }
            if (!n_ad) continue;
            char what[64];
            snprintf(what, sizeof what, "layers.%d.%s", l, AC_LAYER_MATRICES[i].name);
            /* the weights live in m's own image (see ac_model_apply_modules), not in the base */
            float *w = (float *)layer_matrix(&m->w.layers[l], i)->f;
            rc = merge_matrix(w, dim_of(c, AC_LAYER_MATRICES[i].rows), dim_of(c, AC_LAYER_MATRICES[i].cols),
                              ad, n_ad, acc, what);
        }
    free(acc);
    return rc;
}

AC_API int ac_model_apply_modules(const ac_model *base, const ac_module *const *modules, const float *scales,
                                  int n_modules, ac_model **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_model_apply_modules: out is NULL");
    *out = NULL;
    int rc = check_apply_args(base, modules, scales, n_modules);
    if (rc) return rc;
    if (n_modules > 0) {
        unsigned char fingerprint[AC_FINGERPRINT_BYTES];
        ac_blake2b_256(base->data, base->size, fingerprint);
        for (int i = 0; i < n_modules; i++)
            if ((rc = check_base(modules[i], &base->config, fingerprint))) return rc;
    }
    /* A private copy of the whole image: the base (and its file) stay exactly as they were, and
     * the result is a model like any other (it can be quantized, saved, freed on its own). */
    void *img = ac_alloc_model_image(base->size);
    if (!img)
        return ac_fail(AC_ERR_NOMEM, "out of memory for a copy of the model's weights (%zu bytes)",
                       base->size);
    memcpy(img, base->data, base->size);
    ac_model *m;
    rc = ac_model_from_bytes(img, base->size, "model with modules", &m);
    if (rc) {
        free(img);
        return rc;
    }
    m->owned = 1;
    if ((rc = merge_modules(m, modules, scales, n_modules))) {
        ac_model_free(m);
        return rc;
    }
    *out = m;
    return AC_OK;
}
