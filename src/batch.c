/*
 * batch.c - N sequences over one model, each with its own KV cache and its own generation
 * (generation.c), advanced together: each decode step is one forward pass for all of them.
 *
 * Sections, in order:
 *   batch  ac_batch_generate: N prompts in, each sequence sampled independently (sequence i
 *          with seed + i) until it ends
 *   steps  the same batch driven one step at a time by its caller, who samples
 *          (continuous batching)
 */
#include "internal.h"

#include <limits.h>
#include <stdlib.h>

/* ======================================================================== batch */

struct ac_batch {
    const ac_model *model;
    const ac_tokenizer *tok;
    int n_seqs;
    ac_session_params params;
    ac_state *state;       /* one KV cache per sequence */
    ac_generation **gens;  /* (n_seqs) sequence i samples with seed + i */
    int *pos;              /* (n_seqs) positions in each cache */
    int *active;           /* (n_seqs) the sequences of this step's rows, in row order */
    int *row_token;        /* (n_seqs) each row's token */
    int *row_pos;          /* (n_seqs) each row's position */
};

AC_API void ac_batch_free(ac_batch *b) {
    if (!b) return;
    if (b->gens)
        for (int i = 0; i < b->n_seqs; i++) ac_generation_free(b->gens[i]);
    free(b->gens);
    ac_state_free(b->state);
    free(b->pos);
    free(b->active);
    free(b->row_token);
    free(b->row_pos);
    free(b);
}

AC_API int ac_batch_create(const ac_model *m, const ac_tokenizer *tok, int n_seqs,
                           const ac_session_params *params, ac_batch **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_batch_create: out is NULL");
    *out = NULL;
    if (!m || !tok) return ac_fail(AC_ERR_ARG, "ac_batch_create: model and tokenizer are required");
    if (n_seqs < 1 || n_seqs > AC_MAX_BATCH)
        return ac_fail(AC_ERR_ARG, "batch size %d is invalid: it must be in 1..%d", n_seqs, AC_MAX_BATCH);
    ac_session_params p = params ? *params : ac_session_default_params();
    int rc = ac_check_vocab_match(m, tok);
    if (!rc) rc = ac_session_check_params(&p);
    if (rc) return rc;
    ac_batch *b = calloc(1, sizeof *b);
    if (!b) return ac_fail(AC_ERR_NOMEM, "out of memory for the batch");
    b->model = m;
    b->tok = tok;
    b->n_seqs = n_seqs;
    b->params = p;
    b->gens = calloc((size_t)n_seqs, sizeof *b->gens);
    b->pos = calloc((size_t)n_seqs, sizeof *b->pos);
    b->active = calloc((size_t)n_seqs, sizeof *b->active);
    b->row_token = calloc((size_t)n_seqs, sizeof *b->row_token);
    b->row_pos = calloc((size_t)n_seqs, sizeof *b->row_pos);
    rc = (b->gens && b->pos && b->active && b->row_token && b->row_pos)
             ? ac_state_create_seqs(m, n_seqs, p.n_threads, &b->state)
             : ac_fail(AC_ERR_NOMEM, "out of memory for the batch");
    uint64_t base = ac_resolve_seed(p.sampler.seed);
    for (int i = 0; !rc && i < n_seqs; i++)
        rc = ac_generation_create_seeded(m, tok, &p, base + (uint64_t)i, &b->gens[i]);
    if (rc) {
        ac_batch_free(b);
        return rc;
    }
    *out = b;
    return AC_OK;
}

AC_API int ac_batch_max_tokens(const ac_batch *b) {
    if (!b) return 0;
    int room = b->model->config.seq_len - 1; /* every prompt holds BOS at least */
    return b->params.max_new_tokens < room ? b->params.max_new_tokens : room;
}

/* Encodes prompt i with BOS and prefills sequence i with it; its next-token logits go to
 * logits (V floats). */
static int batch_prefill(ac_batch *b, int i, const char *prompt, size_t len, float *logits,
                         ac_batch_result *result) {
    if ((!prompt && len > 0) || len > (size_t)INT_MAX / 4)
        return ac_fail(AC_ERR_ARG, "ac_batch_generate: bad prompt %d", i);
    int cap = (int)len + 3, n;
    int *tokens = malloc((size_t)cap * sizeof *tokens);
    if (!tokens) return ac_fail(AC_ERR_NOMEM, "ac_batch_generate: out of memory");
    int rc = ac_encode(b->tok, prompt, len, 1, 0, tokens, cap, &n);
    int seq_len = b->model->config.seq_len;
    if (!rc && n > seq_len)
        rc = ac_fail(AC_ERR_RANGE, "prompt %d is %d tokens (BOS included) but the model's seq_len is %d",
                     i, n, seq_len);
    if (!rc) rc = ac_prefill(b->state, i, tokens, n, 0, logits, 0);
    if (!rc) {
        b->pos[i] = n;
        result->last_prompt_token = tokens[n - 1];
        ac_generation_reset(b->gens[i]);
        ac_generation_continue(b->gens[i], tokens, n, n);
    }
    free(tokens);
    return rc;
}

AC_API int ac_batch_generate(ac_batch *b, const char *const *prompts, const size_t *lens,
                             int *tokens, ac_batch_result *results) {
    int stride = ac_batch_max_tokens(b);
    if (!b || !prompts || !lens || (stride > 0 && !tokens) || !results)
        return ac_fail(AC_ERR_ARG, "ac_batch_generate: bad arguments");
    int n = b->n_seqs;
    size_t V = (size_t)b->model->config.vocab_size;
    float *logits = ac_state_logits(b->state);
    const char *piece;
    size_t len;
    int n_active = 0;
    for (int i = 0; i < n; i++) {
        ac_batch_result *r = &results[i];
        r->n_generated = 0;
        r->last_prompt_token = -1;
        r->text_len = 0;
        int rc = batch_prefill(b, i, prompts[i], lens[i], logits + (size_t)n_active * V, r);
        if (rc) return rc;
        if (!ac_generation_ended(b->gens[i], &piece, &len)) b->active[n_active++] = i;
        r->stop = b->gens[i]->stop;
    }
    /* Row r of the logits belongs to sequence active[r]: sample each, drop the sequences
     * that ended, and run the rest one position further, all in one forward pass. */
    while (n_active > 0) {
        int rows = 0;
        for (int row = 0; row < n_active; row++) {
            int i = b->active[row], token;
            ac_generation *g = b->gens[i];
            ac_batch_result *r = &results[i];
            int rc = ac_generation_sample(g, logits + (size_t)row * V, &token, &piece, &len);
            if (rc) return rc;
            r->text_len += len;
            if (token >= 0) {
                tokens[(size_t)i * (size_t)stride + (size_t)r->n_generated++] = token;
                if (g->stop == AC_STOP_NONE && ac_generation_ended(g, &piece, &len)) r->text_len += len;
            }
            r->stop = g->stop;
            if (r->stop != AC_STOP_NONE) continue;
            b->active[rows] = i;
            b->row_token[rows] = token;
            b->row_pos[rows] = b->pos[i]++;
            rows++;
        }
        n_active = rows;
        if (rows == 0) break;
        int rc = ac_forward_step(b->state, b->active, b->row_token, b->row_pos, rows);
        if (rc) return rc;
    }
    return AC_OK;
}

AC_API int ac_batch_set_stops(ac_batch *b, const char *const *stops, const size_t *lens, int n) {
    if (!b) return ac_fail(AC_ERR_ARG, "ac_batch_set_stops: batch is NULL");
    for (int i = 0; i < b->n_seqs; i++) {
        int rc = ac_generation_set_stops(b->gens[i], stops, lens, n);
        if (rc) return rc;
    }
    return AC_OK;
}

AC_API int ac_batch_set_logit_bias(ac_batch *b, const int *ids, const float *biases, int n) {
    if (!b) return ac_fail(AC_ERR_ARG, "ac_batch_set_logit_bias: batch is NULL");
    for (int i = 0; i < b->n_seqs; i++) {
        int rc = ac_generation_set_logit_bias(b->gens[i], ids, biases, n);
        if (rc) return rc;
    }
    return AC_OK;
}

/* ======================================================================== steps */

/* The same batch driven one step at a time by the caller (continuous batching: a request
 * that arrives takes a free sequence, one that ends frees it).  Sampling is the caller's:
 * these functions only run tokens and return logits. */

static int check_seq(const ac_batch *b, int seq, const char *fn) {
    if (seq < 0 || seq >= b->n_seqs)
        return ac_fail(AC_ERR_RANGE, "%s: sequence %d is outside the batch [0, %d)", fn, seq, b->n_seqs);
    return AC_OK;
}

AC_API int ac_batch_prefill(ac_batch *b, int seq, const int *tokens, int n_tokens, int pos, float *logits) {
    if (!b || n_tokens < 1 || !tokens) return ac_fail(AC_ERR_ARG, "ac_batch_prefill: bad arguments");
    int rc = check_seq(b, seq, "ac_batch_prefill");
    if (rc) return rc;
    const ac_config *c = &b->model->config;
    if (pos < 0 || (long long)pos + n_tokens > c->seq_len)
        return ac_fail(AC_ERR_RANGE, "%d tokens at position %d do not fit in the model's seq_len %d",
                       n_tokens, pos, c->seq_len);
    if ((rc = ac_check_tokens(tokens, n_tokens, c->vocab_size))) return rc;
    float *out = logits ? logits : ac_state_logits(b->state);
    if ((rc = ac_prefill(b->state, seq, tokens, n_tokens, pos, out, 0))) return rc;
    b->pos[seq] = pos + n_tokens;
    return AC_OK;
}

AC_API int ac_batch_decode(ac_batch *b, int n_rows, const int *seqs, const int *tokens, const int *pos,
                           float *logits) {
    if (!b || n_rows < 1 || !seqs || !tokens || !pos || !logits)
        return ac_fail(AC_ERR_ARG, "ac_batch_decode: bad arguments");
    if (n_rows > b->n_seqs)
        return ac_fail(AC_ERR_RANGE, "ac_batch_decode: %d rows exceed the batch's %d sequences", n_rows,
                       b->n_seqs);
    const ac_config *c = &b->model->config;
    int rc = ac_check_tokens(tokens, n_rows, c->vocab_size);
    if (rc) return rc;
    for (int r = 0; r < n_rows; r++) {
        if ((rc = check_seq(b, seqs[r], "ac_batch_decode"))) return rc;
        if (pos[r] < 0 || pos[r] >= c->seq_len)
            return ac_fail(AC_ERR_RANGE, "row %d: position %d is outside the context [0, %d)", r, pos[r],
                           c->seq_len);
        for (int q = 0; q < r; q++) /* one token per sequence and step */
            if (seqs[q] == seqs[r])
                return ac_fail(AC_ERR_ARG, "ac_batch_decode: sequence %d appears in rows %d and %d", seqs[r],
                               q, r);
    }
    if ((rc = ac_forward_step(b->state, seqs, tokens, pos, n_rows))) return rc;
    for (int r = 0; r < n_rows; r++) b->pos[seqs[r]] = pos[r] + 1;
    memcpy(logits, ac_state_logits(b->state), (size_t)n_rows * (size_t)c->vocab_size * sizeof *logits);
    return AC_OK;
}
