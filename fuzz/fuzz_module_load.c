/*
 * fuzz_module_load.c - libFuzzer harness: ac_module_load_memory() and ac_model_apply_modules()
 * on arbitrary bytes.
 *
 * Any input must either load as a module or fail with AC_ERR_FORMAT and a message naming the
 * buffer; never crash, read out of bounds or leak.  A module that loads is applied to a
 * built-in tiny base: it applies only if it was made for that base (else AC_ERR_MISMATCH); at
 * scale 0 the result must give the base's logits bit for bit, and at scale 1 it must run (or
 * be refused with AC_ERR_RANGE when a merged weight overflows).  Inputs are tried twice: as
 * given, and with the base's shape and fingerprint written into the header, so that mutations
 * of the rest of the file reach the merge.  The bytes (up to a NUL) are also split as a
 * MODULE[:SCALE] argument: the path is all of it, or what comes before a ':', and the scale
 * is finite.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "run.h"

#define NAME "fuzz"
#define HEADER_BYTES 128
#define SHAPE_AT 20
#define FINGERPRINT_AT 52
#define N_TOKENS 3

/* The base: v1, tied classifier, dim 8, hidden 16, 2 layers, 2 heads, 1 kv head, vocab 6, seq 4. */
static const int32_t SHAPE[7] = {8, 16, 2, 2, 1, 6, 4};

static void fuzz_assert(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "fuzz_module_load: invariant failed: %s (last error: %s)\n", what, ac_last_error());
        abort();
    }
}

static ac_model *g_base;
static unsigned char g_fingerprint[AC_FINGERPRINT_BYTES];
static float g_base_logits[N_TOKENS * 6];
static const int TOKENS[N_TOKENS] = {1, 4, 2};

/* The base's file image: the v1 header, then every float from a fixed linear congruential
 * sequence in [-0.5, 0.5) (norms near 1), so it is the same in every run. */
static void *base_image(size_t *size) {
    int D = SHAPE[0], H = SHAPE[1], L = SHAPE[2], KV = SHAPE[0] / SHAPE[3] * SHAPE[4], V = SHAPE[5];
    size_t norms = (size_t)(2 * L * D + D);
    size_t floats = norms + (size_t)V * D + (size_t)L * (2 * D * D + 2 * KV * D + 3 * H * D);
    *size = 256 + 4 * floats;
    unsigned char *img = calloc(1, *size);
    fuzz_assert(img != NULL, "base allocation");
    uint32_t magic = 0x616b3432u, version = 1;
    memcpy(img, &magic, 4);
    memcpy(img + 4, &version, 4);
    memcpy(img + 8, SHAPE, sizeof SHAPE);
    img[36] = 1; /* shared classifier */
    float *w = (float *)(img + 256);
    uint32_t x = 12345;
    for (size_t i = 0; i < floats; i++) {
        x = x * 1664525u + 1013904223u;
        float r = (float)(x >> 8) / 16777216.0f - 0.5f;
        w[i] = i < norms ? 1.0f + 0.1f * r : r;
    }
    return img;
}

static void logits_of(const ac_model *m, float *out) {
    ac_state *s = NULL;
    fuzz_assert(ac_state_create(m, &s) == AC_OK, "state");
    fuzz_assert(ac_state_set_threads(s, 1) == AC_OK, "threads");
    int rc = ac_logits(s, TOKENS, N_TOKENS, out);
    fuzz_assert(rc == AC_OK || (rc != AC_ERR_ARG && rc != AC_ERR_RANGE && *ac_last_error()), "logits");
    ac_state_free(s);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    size_t size;
    void *img = base_image(&size); /* kept for the whole run: the base borrows it */
    fuzz_assert(ac_model_load_memory(img, size, "base", &g_base) == AC_OK, "base loads");
    fuzz_assert(ac_model_fingerprint(g_base, g_fingerprint) == AC_OK, "fingerprint");
    logits_of(g_base, g_base_logits);
    return 0;
}

static void try_module(const uint8_t *data, size_t size) {
    ac_module *m = NULL;
    int rc = ac_module_load_memory(data, size, NAME, &m);
    if (rc != AC_OK) {
        fuzz_assert(rc == AC_ERR_FORMAT || rc == AC_ERR_NOMEM, "a bad module is AC_ERR_FORMAT");
        fuzz_assert(strncmp(ac_last_error(), NAME ": ", strlen(NAME) + 2) == 0, "message names the buffer");
        fuzz_assert(m == NULL, "no module on failure");
        return;
    }
    ac_module_info info;
    fuzz_assert(ac_module_get_info(m, &info) == AC_OK, "info");
    fuzz_assert(info.rank >= 1 && info.rank <= AC_MAX_MODULE_RANK && info.n_targets >= 1, "info ranges");
    fuzz_assert((uint64_t)size == HEADER_BYTES + 8ull * (uint64_t)info.n_targets + 4ull * info.n_params,
                "the size is what the header and targets imply");
    const ac_module *mods[1] = {m};
    float zero = 0.0f, one = 1.0f;
    ac_model *z = NULL;
    rc = ac_model_apply_modules(g_base, mods, &zero, 1, &z);
    int same_base = !memcmp(info.base_fingerprint, g_fingerprint, AC_FINGERPRINT_BYTES);
    if (rc != AC_OK) {
        fuzz_assert(rc == AC_ERR_MISMATCH && !(same_base && info.base.dim == SHAPE[0] &&
                    info.base.hidden_dim == SHAPE[1] && info.base.n_layers == SHAPE[2] &&
                    info.base.n_heads == SHAPE[3] && info.base.n_kv_heads == SHAPE[4] &&
                    info.base.vocab_size == SHAPE[5] && info.base.seq_len == SHAPE[6]),
                    "only a module for another base is refused");
        ac_module_free(m);
        return;
    }
    float logits[N_TOKENS * 6];
    logits_of(z, logits);
    fuzz_assert(!memcmp(logits, g_base_logits, sizeof logits), "scale 0 gives the base's logits bit for bit");
    ac_model_free(z);
    ac_model *o = NULL;
    rc = ac_model_apply_modules(g_base, mods, &one, 1, &o);
    fuzz_assert(rc == AC_OK || rc == AC_ERR_RANGE, "scale 1 merges or reports an overflow");
    if (rc == AC_OK) {
        logits_of(o, logits);
        ac_model_free(o);
    }
    ac_module_free(m);
}

/* ac_module_spec on the bytes as a C string. */
static void try_spec(const uint8_t *data, size_t size) {
    char *spec = malloc(size + 1);
    fuzz_assert(spec != NULL, "copy");
    memcpy(spec, data, size);
    spec[size] = '\0';
    size_t len = strlen(spec), path_len = 0;
    float scale = 0.0f;
    fuzz_assert(ac_module_spec(spec, &path_len, &scale) == AC_OK, "ac_module_spec");
    fuzz_assert(path_len == len || (path_len > 0 && spec[path_len] == ':'), "the path is all or ends before a ':'");
    fuzz_assert(isfinite(scale) && (path_len < len || scale == 1.0f), "a finite scale, 1 without one");
    free(spec);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    try_spec(data, size);
    try_module(data, size);
    if (size < HEADER_BYTES) return 0;
    uint8_t *patched = malloc(size);
    fuzz_assert(patched != NULL, "copy");
    memcpy(patched, data, size);
    memcpy(patched + SHAPE_AT, SHAPE, sizeof SHAPE);
    memcpy(patched + FINGERPRINT_AT, g_fingerprint, AC_FINGERPRINT_BYTES);
    try_module(patched, size);
    free(patched);
    return 0;
}
