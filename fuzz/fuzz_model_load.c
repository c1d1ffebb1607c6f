/*
 * fuzz_model_load.c - libFuzzer harness: ac_model_load_memory() on arbitrary bytes.
 *
 * Any input must either load or fail with a result code and a message naming the buffer;
 * never crash, read out of bounds or leak.  Models that load and are tiny also run one or
 * two forward steps and a sampling step, so every weight pointer the loader computed is read.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "run.h"

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
    uint64_t scratch = 6ull * (uint64_t)c->dim + 2ull * (uint64_t)c->hidden_dim +
                       (uint64_t)c->n_heads * (uint64_t)c->seq_len + 2ull * (uint64_t)c->vocab_size;
    return cache + scratch <= FORWARD_MAX_FLOATS;
}

/* One or two forward steps plus a sample: reads every weight the loader pointed at. */
static void run_model(const ac_model *m, const ac_config *c, const uint8_t *data, size_t size) {
    ac_state *state = NULL;
    if (ac_state_create(m, &state) != AC_OK) return; /* allocation refused: fine */
    int token = size ? (int)(data[size - 1] % (unsigned)c->vocab_size) : 0;
    const float *logits = NULL;
    fuzz_assert(ac_forward(state, token, 0, &logits) == AC_OK && logits, "forward at position 0");
    if (c->seq_len > 1)
        fuzz_assert(ac_forward(state, 0, 1, &logits) == AC_OK, "forward at position 1");
    fuzz_assert(ac_forward(state, c->vocab_size, 0, NULL) == AC_ERR_RANGE, "token out of range");
    fuzz_assert(ac_forward(state, 0, c->seq_len, NULL) == AC_ERR_RANGE, "position out of range");
    ac_sampler_params params = ac_sampler_default_params();
    params.top_k = 3;
    ac_sampler *sampler = NULL;
    if (ac_sampler_create(&params, c->vocab_size, &sampler) == AC_OK) {
        int next = -1;
        fuzz_assert(ac_sample(sampler, logits, &next) == AC_OK, "sample");
        fuzz_assert(next >= 0 && next < c->vocab_size, "sampled token in range");
        ac_sampler_free(sampler);
    }
    ac_state_free(state);
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
        if (is_tiny(&c)) run_model(m, &c, data, size);
        ac_model_free(m);
    }
    free(copy);
    return 0;
}
