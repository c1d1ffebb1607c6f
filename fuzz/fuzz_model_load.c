/*
 * fuzz_model_load.c - libFuzzer harness: ac_model_load_memory() on arbitrary bytes.
 *
 * Any input must either load or fail with a result code and a message naming the buffer;
 * never crash, read out of bounds or leak.  Models that load and are tiny also run a few
 * tokens through the prefill and the decode paths (which must agree bit for bit, or both
 * refuse logits that are not numbers with AC_ERR_NUMERIC), sample,
 * and (float32 models) are quantized to int8 and run again: every weight pointer the loader
 * computed is read, by the float32 and the int8 kernels.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "run.h"
#include "testing.h" /* ac_logits_stepwise */

/* Models above these bounds load but skip the forward pass (it would make fuzzing slow). */
#define FORWARD_MAX_FLOATS (1u << 18) /* KV cache + activations */

static void fuzz_assert(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "fuzz_model_load: invariant failed: %s (last error: %s)\n", what,
                ac_last_error());
        abort();
    }
}

static int is_tiny(const ac_config *c) {
    uint64_t kv_dim = (uint64_t)(c->dim / c->n_heads) * (uint64_t)c->n_kv_heads;
    uint64_t cache = 2ull * (uint64_t)c->n_layers * (uint64_t)c->seq_len * kv_dim;
    uint64_t scratch = 3ull * (6ull * (uint64_t)c->dim + 2ull * (uint64_t)c->hidden_dim +
                              (uint64_t)c->n_heads * (uint64_t)c->seq_len) +
                       8ull * (uint64_t)c->vocab_size;
    return cache + scratch <= FORWARD_MAX_FLOATS;
}

/* Same logits (they are numbers: the library refuses NaN and infinite ones). */
static int same_floats(const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}

/* A few tokens through the prefill path (ac_logits) and the decode path (one ac_forward per
 * token): every weight the loader pointed at is read, and the two paths must agree bit for
 * bit as run.h promises.  Then a sampling step on the last logits. */
static void run_model(const ac_model *m, const ac_config *c, const uint8_t *data, size_t size,
                      int n_threads) {
    enum { MAX_T = 3 };
    int n = c->seq_len < MAX_T ? c->seq_len : MAX_T, tokens[MAX_T];
    for (int t = 0; t < n; t++)
        tokens[t] = (int)((size > (size_t)t ? data[size - 1 - t] : t) % (unsigned)c->vocab_size);
    size_t V = (size_t)c->vocab_size;
    float *prefill = malloc((size_t)n * V * sizeof(float)), *stepwise = malloc((size_t)n * V * sizeof(float));
    ac_state *state = NULL;
    if (!prefill || !stepwise || ac_state_create(m, &state) != AC_OK) { /* allocation refused */
        free(prefill);
        free(stepwise);
        return;
    }
    fuzz_assert(ac_state_set_threads(state, n_threads) == AC_OK, "set threads");
    fuzz_assert(ac_forward(state, c->vocab_size, 0, NULL) == AC_ERR_RANGE, "token out of range");
    fuzz_assert(ac_forward(state, 0, c->seq_len, NULL) == AC_ERR_RANGE, "position out of range");
    /* finite weights may still overflow float32: then both paths refuse the logits alike */
    int rc = ac_logits(state, tokens, n, prefill);
    fuzz_assert(rc == AC_OK || rc == AC_ERR_NUMERIC, "prefill: logits or AC_ERR_NUMERIC");
    fuzz_assert(ac_logits_stepwise(state, tokens, n, stepwise) == rc, "stepwise fails as prefill does");
    const float *logits = NULL;
    if (rc == AC_OK) {
        fuzz_assert(same_floats(prefill, stepwise, (size_t)n * V), "prefill == stepwise");
        fuzz_assert(ac_forward(state, tokens[0], 0, &logits) == AC_OK && logits, "forward");
        fuzz_assert(same_floats(logits, prefill, V), "forward == prefill row 0");
    }
    ac_sampler_params params = ac_sampler_default_params();
    params.top_k = 3;
    ac_sampler *sampler = NULL;
    if (logits && ac_sampler_create(&params, c->vocab_size, &sampler) == AC_OK) {
        int next = -1;
        fuzz_assert(ac_sample(sampler, logits, &next) == AC_OK, "sample");
        fuzz_assert(next >= 0 && next < c->vocab_size, "sampled token in range");
        ac_sampler_free(sampler);
    }
    ac_state_free(state);
    free(prefill);
    free(stepwise);
}

/* A float32 model quantized to int8 (the smallest group size that fits) runs too. */
static void run_quantized(const ac_model *m, const ac_config *c, const uint8_t *data, size_t size) {
    if (c->group_size || c->dim % 4 || c->hidden_dim % 4) return;
    ac_model *q = NULL;
    int rc = ac_model_quantize(m, 4, &q);
    /* an embedding of denormals quantizes to zeros, which no model may be */
    fuzz_assert(rc == AC_OK || (rc == AC_ERR_NUMERIC && !q && strstr(ac_last_error(), "too small for int8")),
                "quantize with group size 4: a model or AC_ERR_NUMERIC");
    if (rc) return;
    ac_config qc;
    fuzz_assert(ac_model_config(q, &qc) == AC_OK && qc.version == 2 && qc.group_size == 4,
                "quantized config");
    run_model(q, &qc, data, size, 1);
    ac_model_free(q);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* the loader needs a 4-byte aligned buffer; malloc's is, and ASan bounds it exactly */
    void *copy = malloc(size ? size : 1);
    if (!copy) return 0;
    if (size) memcpy(copy, data, size);
    ac_model *m = NULL;
    int rc = ac_model_load_memory(copy, size, "fuzz.bin", &m);
    if (rc != AC_OK) {
        fuzz_assert(m == NULL, "no model on failure");
        fuzz_assert(strncmp(ac_last_error(), "fuzz.bin: ", 10) == 0, "message names the buffer");
        fuzz_assert(rc == AC_ERR_FORMAT, "a bad buffer is a format error");
    } else {
        ac_config c;
        fuzz_assert(ac_model_config(m, &c) == AC_OK, "config");
        fuzz_assert(c.dim > 0 && c.dim % c.n_heads == 0 && c.n_heads % c.n_kv_heads == 0 &&
                        (c.dim / c.n_heads) % 2 == 0 && c.vocab_size > 0 && c.seq_len > 0,
                    "a loaded config is valid");
        if (is_tiny(&c)) {
            run_model(m, &c, data, size, 1 + (size & 1)); /* 1 or 2 threads */
            run_quantized(m, &c, data, size);
        }
        ac_model_free(m);
    }
    free(copy);
    return 0;
}
