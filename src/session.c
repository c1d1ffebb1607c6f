/*
 * session.c - a session: one sequence over a model and tokenizer, with its own state (the KV
 * cache) and its own generation (generation.c: sampler, stop rule, stop strings).  The caller
 * feeds text or tokens, then asks for one token at a time (ac_session_next); ac_generate is
 * the loop over it that hands each piece to a callback, ac_session_next_text the loop that
 * gathers many tokens' text for one call.
 *
 * A sampled token waits as `pending` and runs through the model only when the next token or
 * feed needs its logits: a generation that ends after it never pays for that forward pass.
 */
#include "internal.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

struct ac_session {
    const ac_model *model;
    const ac_tokenizer *tok;
    ac_state *state;
    ac_generation *gen; /* sampler, stop rule, stop strings; its context is the cache's + pending */
    int pos;            /* positions already in the KV cache */
    int pending;        /* sampled but not yet run through the model, or -1 */
    int has_logits;     /* the state's logits belong to the token at pos - 1 */
    char *text;         /* ac_session_next_text's bytes */
    size_t text_cap;
};

AC_API void ac_session_free(ac_session *s) {
    if (!s) return;
    ac_state_free(s->state);
    ac_generation_free(s->gen);
    free(s->text);
    free(s);
}

AC_API void ac_session_reset(ac_session *s) {
    if (!s) return;
    s->pos = 0;
    s->pending = -1;
    s->has_logits = 0;
    ac_generation_reset(s->gen);
}

AC_API int ac_session_set_params(ac_session *s, const ac_session_params *params) {
    if (!s || !params) return ac_fail(AC_ERR_ARG, "ac_session_set_params: NULL argument");
    int rc = ac_session_check_params(params);
    if (!rc) rc = ac_state_set_threads(s->state, params->n_threads);
    if (!rc) rc = ac_generation_set_params(s->gen, params);
    return rc;
}

AC_API int ac_session_set_stops(ac_session *s, const char *const *stops, const size_t *lens, int n) {
    if (!s) return ac_fail(AC_ERR_ARG, "ac_session_set_stops: session is NULL");
    return ac_generation_set_stops(s->gen, stops, lens, n);
}

AC_API int ac_session_set_logit_bias(ac_session *s, const int *ids, const float *biases, int n) {
    if (!s) return ac_fail(AC_ERR_ARG, "ac_session_set_logit_bias: session is NULL");
    return ac_generation_set_logit_bias(s->gen, ids, biases, n);
}

AC_API int ac_session_create(const ac_model *m, const ac_tokenizer *tok,
                             const ac_session_params *params, ac_session **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_session_create: out is NULL");
    *out = NULL;
    if (!m || !tok) return ac_fail(AC_ERR_ARG, "ac_session_create: model and tokenizer are required");
    ac_session_params p = params ? *params : ac_session_default_params();
    int rc = ac_check_vocab_match(m, tok);
    if (!rc) rc = ac_session_check_params(&p);
    if (rc) return rc;
    ac_session *s = calloc(1, sizeof *s);
    if (!s) return ac_fail(AC_ERR_NOMEM, "out of memory for the session");
    s->model = m;
    s->tok = tok;
    rc = ac_generation_create_seeded(m, tok, &p, ac_resolve_seed(p.sampler.seed), &s->gen);
    if (!rc) rc = ac_state_create_seqs(m, 1, p.n_threads, &s->state);
    if (rc) {
        ac_session_free(s);
        return rc;
    }
    ac_session_reset(s);
    *out = s;
    return AC_OK;
}

AC_API int ac_session_position(const ac_session *s) { return s ? s->pos : 0; }

AC_API ac_stop_reason ac_session_stop_reason(const ac_session *s) { return s ? s->gen->stop : AC_STOP_NONE; }

/* Runs token at the next position; its logits replace the state's. */
static int run_token(ac_session *s, int token) {
    static const int seq = 0;
    int rc = ac_forward_step(s->state, &seq, &token, &s->pos, 1);
    if (rc) return rc;
    s->pos++;
    s->has_logits = 1;
    return AC_OK;
}

AC_API int ac_session_feed_tokens(ac_session *s, const int *tokens, int n_tokens) {
    if (!s || n_tokens < 0 || (n_tokens > 0 && !tokens))
        return ac_fail(AC_ERR_ARG, "ac_session_feed_tokens: bad arguments");
    int seq_len = s->model->config.seq_len;
    int rc = ac_check_tokens(tokens, n_tokens, s->model->config.vocab_size);
    if (rc) return rc;
    int in_use = s->pos + (s->pending >= 0);
    if ((long long)in_use + n_tokens > seq_len) {
        if (in_use == 0) /* the first feed: the prompt itself is too long */
            return ac_fail(AC_ERR_RANGE, "the prompt is %d tokens%s but the model's seq_len is %d", n_tokens,
                           tokens[0] == AC_TOKEN_BOS ? " (BOS included)" : "", seq_len);
        return ac_fail(AC_ERR_RANGE, "%d tokens do not fit: %d of the model's seq_len %d are in use",
                       n_tokens, in_use, seq_len);
    }
    if (s->pending >= 0) {
        if ((rc = run_token(s, s->pending))) return rc;
        s->pending = -1;
    }
    if (n_tokens > 0) { /* one prefill pass: matrix-matrix products over the tokens */
        rc = ac_prefill(s->state, 0, tokens, n_tokens, s->pos, ac_state_logits(s->state), 0);
        if (rc) {
            s->has_logits = 0; /* they were overwritten (with non-numbers): nothing to sample */
            return rc;
        }
        s->pos += n_tokens;
        s->has_logits = 1;
    }
    ac_generation_continue(s->gen, tokens, n_tokens, s->pos);
    return AC_OK;
}

AC_API int ac_session_feed(ac_session *s, const char *text, size_t len, int bos) {
    if (!s || (!text && len > 0)) return ac_fail(AC_ERR_ARG, "ac_session_feed: bad arguments");
    if (len > (size_t)INT_MAX / 4) return ac_fail(AC_ERR_RANGE, "ac_session_feed: text is too long");
    int cap = (int)len + 3, n;
    int *tokens = malloc((size_t)cap * sizeof *tokens);
    if (!tokens) return ac_fail(AC_ERR_NOMEM, "ac_session_feed: out of memory");
    int rc = ac_encode(s->tok, text, len, bos, 0, tokens, cap, &n);
    if (!rc) rc = ac_session_feed_tokens(s, tokens, n);
    free(tokens);
    return rc;
}

AC_API int ac_session_next(ac_session *s, int *token, const char **piece, size_t *len) {
    if (!s || !token) return ac_fail(AC_ERR_ARG, "ac_session_next: NULL argument");
    *token = -1;
    if (piece) *piece = "";
    if (len) *len = 0;
    const char *p;
    size_t n;
    if (s->pending < 0 && !s->has_logits) return AC_OK; /* nothing fed */
    if (ac_generation_ended(s->gen, &p, &n)) {
        if (piece) *piece = p;
        if (len) *len = n;
        return AC_OK;
    }
    int rc;
    if (s->pending >= 0) {
        if ((rc = run_token(s, s->pending))) return rc;
        s->pending = -1;
    }
    if ((rc = ac_generation_sample(s->gen, ac_state_logits(s->state), token, &p, &n))) return rc;
    if (*token >= 0) s->pending = *token;
    if (piece) *piece = p;
    if (len) *len = n;
    return AC_OK;
}

AC_API int ac_session_next_text(ac_session *s, int max_tokens, const char **text, size_t *len, int *n_generated) {
    if (n_generated) *n_generated = 0;
    if (text) *text = "";
    if (len) *len = 0;
    if (!s || !text || !len) return ac_fail(AC_ERR_ARG, "ac_session_next_text: NULL argument");
    if (max_tokens < 1) return ac_fail(AC_ERR_ARG, "ac_session_next_text: max_tokens %d is invalid: it must be "
                                                   "1 or more", max_tokens);
    size_t used = 0;
    int n = 0, rc = AC_OK;
    while (n < max_tokens) {
        int token;
        const char *piece;
        size_t piece_len;
        if ((rc = ac_session_next(s, &token, &piece, &piece_len))) break;
        if (piece_len > 0) {
            if ((rc = ac_grow((void **)&s->text, &s->text_cap, used + piece_len, 1, "a generation's text in bytes")))
                break;
            memcpy(s->text + used, piece, piece_len);
            used += piece_len;
        }
        if (token < 0) break; /* ended: the held-back bytes came last */
        n++;
    }
    if (used > 0) *text = s->text;
    *len = used;
    if (n_generated) *n_generated = n;
    return rc;
}

AC_API int ac_generate(ac_session *s, const char *prompt, size_t len, ac_piece_fn on_piece,
                       void *user, int *n_generated) {
    if (n_generated) *n_generated = 0;
    if (!s || (!prompt && len > 0)) return ac_fail(AC_ERR_ARG, "ac_generate: bad arguments");
    ac_session_reset(s);
    int rc = ac_session_feed(s, prompt, len, 1);
    int n = 0;
    while (!rc) {
        int token;
        const char *piece;
        size_t piece_len;
        if ((rc = ac_session_next(s, &token, &piece, &piece_len))) break;
        if (token < 0) { /* ended: text held back for the stop strings comes last */
            if (on_piece && piece_len > 0) on_piece(user, -1, piece, piece_len);
            break;
        }
        n++;
        if (on_piece && on_piece(user, token, piece, piece_len)) {
            s->gen->stop = AC_STOP_CALLER;
            break;
        }
    }
    if (n_generated) *n_generated = n;
    return rc;
}
