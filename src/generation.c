/*
 * generation.c - the rules of one generation, whoever runs the model: its settings
 * (ac_session_params: defaults, checks, the seed), its one stop rule, and the ac_generation
 * object that samples the next token from given logits and holds the stop strings and the
 * logit bias.  Sessions (session.c) and batches (batch.c) own generations and run the model
 * for them; a caller that runs the model itself (continuous batching) creates its own.  The
 * settings live here, not with sessions, because every kind of generation uses them.
 *
 * Sections, in order:
 *   settings    defaults, checks, seeds, and when a generation stops
 *   generation  one generation's sampler, stop rule and stop strings
 *
 * Every token a sequence's context gets (fed or sampled) is recorded in its sampler
 * (ac_sampler_accept), whose penalties look at the recent ones.  Stop strings are matched on
 * the decoded bytes: bytes that may start one are held back until they cannot, and dropped
 * when it completes, so no front end ever shows part of a stop string.
 */
#include "internal.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

/* ======================================================================== settings */

AC_API ac_session_params ac_session_default_params(void) {
    ac_session_params p;
    memset(&p, 0, sizeof p);
    p.sampler = ac_sampler_default_params();
    p.sampler.seed = AC_SEED_RANDOM;
    p.max_new_tokens = AC_DEFAULT_MAX_NEW_TOKENS;
    p.n_threads = 0;
    p.ignore_eos = 0;
    return p;
}

AC_API int ac_session_check_params(const ac_session_params *p) {
    if (!p) return ac_fail(AC_ERR_ARG, "ac_session_check_params: params is NULL");
    int rc = ac_sampler_check_params(&p->sampler);
    if (rc) return rc;
    if (p->max_new_tokens < 0)
        return ac_fail(AC_ERR_ARG, "max_new_tokens %d is invalid: it must be >= 0", p->max_new_tokens);
    return ac_check_thread_count(p->n_threads);
}

/* A fresh seed comes from the clock and a process-wide counter (so sessions created in the
 * same instant still differ), mixed by splitmix64's finalizer. */
uint64_t ac_resolve_seed(uint64_t seed) {
    static atomic_uint_fast64_t counter;
    if (seed != AC_SEED_RANDOM) return seed;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t z = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec +
                 0x9E3779B97F4A7C15ull * (uint64_t)atomic_fetch_add(&counter, 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z == AC_SEED_RANDOM ? z - 1 : z;
}

/* The stop rule of every generation (sessions, ac_generate, batches), in one place: a
 * sequence that has reported n tokens since its last feed and fills `filled` positions of
 * the context (a sampled token included) reports no more tokens when it has reported
 * max_new_tokens, or when a new token would not fit in seq_len. */
static ac_stop_reason limit_reached(const ac_session_params *p, int n, int filled, int seq_len) {
    if (n >= p->max_new_tokens) return AC_STOP_LENGTH;
    if (filled >= seq_len) return AC_STOP_CONTEXT;
    return AC_STOP_NONE;
}

/* ... and it ends when the model samples BOS or EOS, unless those are ignored. */
static int ends_text(const ac_session_params *p, int token) {
    return !p->ignore_eos && (token == AC_TOKEN_BOS || token == AC_TOKEN_EOS);
}

int ac_check_vocab_match(const ac_model *m, const ac_tokenizer *tok) {
    if (ac_tokenizer_vocab_size(tok) == m->config.vocab_size) return AC_OK;
    return ac_fail(AC_ERR_MISMATCH, "tokenizer has %d pieces but the model's vocab_size is %d",
                   ac_tokenizer_vocab_size(tok), m->config.vocab_size);
}

/* A sampler for params' settings, seeded with seed (already resolved). */
static int make_sampler(const ac_session_params *p, uint64_t seed, int vocab_size, ac_sampler **out) {
    ac_sampler_params sp = p->sampler;
    sp.seed = seed;
    return ac_sampler_create(&sp, vocab_size, out);
}

/* ======================================================================== generation */

/* struct ac_generation is in internal.h: sessions and batches read and set its stop reason. */

AC_API void ac_generation_free(ac_generation *g) {
    if (!g) return;
    ac_sampler_free(g->sampler);
    free(g->bias_ids);
    free(g->bias_values);
    free(g->stop_bytes);
    free(g->stop_len);
    free(g->text);
    free(g);
}

/* A new sampler for params (seed resolved here), with the logit bias given to it and the
 * recent tokens of the one it replaces (the context is the same, so are its penalties). */
static int gen_new_sampler(ac_generation *g, const ac_session_params *p, uint64_t seed) {
    ac_sampler *sampler;
    int rc = make_sampler(p, seed, g->model->config.vocab_size, &sampler);
    if (!rc && g->n_bias > 0) rc = ac_sampler_set_logit_bias(sampler, g->bias_ids, g->bias_values, g->n_bias);
    if (rc) {
        ac_sampler_free(sampler);
        return rc;
    }
    if (g->sampler) ac_sampler_copy_history(sampler, g->sampler);
    ac_sampler_free(g->sampler);
    g->sampler = sampler;
    return AC_OK;
}

int ac_generation_create_seeded(const ac_model *m, const ac_tokenizer *tok, const ac_session_params *p,
                                uint64_t seed, ac_generation **out) {
    ac_generation *g = calloc(1, sizeof *g);
    if (!g) return ac_fail(AC_ERR_NOMEM, "out of memory for the generation");
    g->model = m;
    g->tok = tok;
    g->params = *p;
    g->last = -1;
    int rc = gen_new_sampler(g, p, seed);
    if (rc) {
        ac_generation_free(g);
        return rc;
    }
    *out = g;
    return AC_OK;
}

int ac_generation_set_params(ac_generation *g, const ac_session_params *p) {
    int rc = gen_new_sampler(g, p, ac_resolve_seed(p->sampler.seed));
    if (rc) return rc;
    g->params = *p;
    g->n_reported = 0;
    g->stop = AC_STOP_NONE;
    return AC_OK;
}

void ac_generation_reset(ac_generation *g) {
    ac_sampler_reset_history(g->sampler);
    g->last = -1;
    g->filled = 0;
    g->n_reported = 0;
    g->n_held = 0;
    g->stop = AC_STOP_NONE;
}

void ac_generation_continue(ac_generation *g, const int *tokens, int n, int filled) {
    for (int i = 0; i < n; i++) ac_sampler_accept(g->sampler, tokens[i]);
    if (n > 0) g->last = tokens[n - 1];
    g->filled = filled;
    g->n_reported = 0;
    g->n_held = 0;
    g->stop = AC_STOP_NONE;
}

static int set_logit_bias(ac_generation *g, const int *ids, const float *biases, int n) {
    if (n < 0 || (n > 0 && (!ids || !biases))) return ac_fail(AC_ERR_ARG, "logit bias: bad arguments");
    /* the sampler checks the ids and values before anything is kept */
    int rc = ac_sampler_set_logit_bias(g->sampler, ids, biases, n);
    if (rc) return rc;
    int *kept_ids = n ? malloc((size_t)n * sizeof *kept_ids) : NULL;
    float *kept_values = n ? malloc((size_t)n * sizeof *kept_values) : NULL;
    if (n && (!kept_ids || !kept_values)) {
        free(kept_ids);
        free(kept_values);
        ac_sampler_set_logit_bias(g->sampler, g->bias_ids, g->bias_values, g->n_bias);
        return ac_fail(AC_ERR_NOMEM, "out of memory for the logit bias");
    }
    if (n) {
        memcpy(kept_ids, ids, (size_t)n * sizeof *kept_ids);
        memcpy(kept_values, biases, (size_t)n * sizeof *kept_values);
    }
    free(g->bias_ids);
    free(g->bias_values);
    g->bias_ids = kept_ids;
    g->bias_values = kept_values;
    g->n_bias = n;
    return AC_OK;
}

static int set_stops(ac_generation *g, const char *const *stops, const size_t *lens, int n) {
    if (n < 0 || n > AC_MAX_STOPS || (n > 0 && (!stops || !lens)))
        return ac_fail(AC_ERR_ARG, "stop strings: bad arguments (%d strings; at most %d)", n, AC_MAX_STOPS);
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        if (!stops[i] || lens[i] == 0 || lens[i] > AC_MAX_STOP_BYTES)
            return ac_fail(AC_ERR_ARG, "stop string %d is invalid: it must be 1..%d bytes", i, AC_MAX_STOP_BYTES);
        total += lens[i];
    }
    char *bytes = n ? malloc(total) : NULL;
    size_t *len = n ? malloc((size_t)n * sizeof *len) : NULL;
    if (n && (!bytes || !len)) {
        free(bytes);
        free(len);
        return ac_fail(AC_ERR_NOMEM, "out of memory for the stop strings");
    }
    for (size_t i = 0, at = 0; i < (size_t)n; at += lens[i], i++) {
        memcpy(bytes + at, stops[i], lens[i]);
        len[i] = lens[i];
    }
    free(g->stop_bytes);
    free(g->stop_len);
    g->stop_bytes = bytes;
    g->stop_len = len;
    g->n_stops = n;
    g->n_held = 0;
    return AC_OK;
}

/* Ends the generation for reason, releasing the held bytes into *piece: they did not start a
 * stop string after all. */
static void gen_end(ac_generation *g, ac_stop_reason reason, const char **piece, size_t *len) {
    g->stop = reason;
    *piece = g->n_held ? g->text + g->held_at : "";
    *len = g->n_held;
    g->n_held = 0;
}

int ac_generation_ended(ac_generation *g, const char **piece, size_t *len) {
    *piece = "";
    *len = 0;
    if (g->stop != AC_STOP_NONE) return 1;
    ac_stop_reason why = limit_reached(&g->params, g->n_reported, g->filled, g->model->config.seq_len);
    if (why == AC_STOP_NONE) return 0;
    gen_end(g, why, piece, len);
    return 1;
}

/* Whether stop string k starts at buf[at] and fits in buf[0..n) (whole: 1; only its first
 * n - at bytes: 2; not at all: 0). */
static int stop_at(const ac_generation *g, size_t k, const char *stop, const char *buf, size_t at, size_t n) {
    size_t room = n - at, want = g->stop_len[k];
    if (room >= want) return memcmp(buf + at, stop, want) == 0;
    return memcmp(buf + at, stop, room) == 0 ? 2 : 0;
}

/* Appends a decoded piece to the held bytes and points *out at what is final: everything
 * before the first stop string (and the generation ends there), else everything but the
 * longest tail that could still grow into one.  Without stop strings the piece is final. */
static int gen_match(ac_generation *g, const char *piece, size_t n_piece, const char **out, size_t *out_len) {
    if (g->n_stops == 0) {
        *out = piece;
        *out_len = n_piece;
        return AC_OK;
    }
    size_t n = g->n_held + n_piece;
    if (n == 0) {
        *out = "";
        *out_len = 0;
        return AC_OK;
    }
    int rc = ac_grow((void **)&g->text, &g->text_cap, n, 1, "the generated text in bytes");
    if (rc) return rc;
    memmove(g->text, g->text + g->held_at, g->n_held);
    memcpy(g->text + g->n_held, piece, n_piece);
    const char *buf = g->text;
    size_t keep_from = n; /* the first byte where a stop string may still start */
    for (size_t at = 0; at < n; at++) {
        const char *stop = g->stop_bytes;
        for (int k = 0; k < g->n_stops; stop += g->stop_len[k], k++) {
            int found = stop_at(g, (size_t)k, stop, buf, at, n);
            if (found == 1) { /* the first stop string to complete: the text ends before it */
                g->stop = AC_STOP_STRING;
                g->held_at = g->n_held = 0;
                *out = buf;
                *out_len = at;
                return AC_OK;
            }
            if (found == 2 && keep_from == n) keep_from = at;
        }
    }
    g->held_at = keep_from;
    g->n_held = n - keep_from;
    *out = buf;
    *out_len = keep_from;
    return AC_OK;
}

int ac_generation_sample(ac_generation *g, const float *logits, int *token, const char **piece, size_t *len) {
    *token = -1;
    int next, rc = ac_sample(g->sampler, logits, &next);
    if (rc) return rc;
    if (ends_text(&g->params, next)) {
        gen_end(g, AC_STOP_END, piece, len);
        return AC_OK;
    }
    const char *p;
    size_t n;
    if ((rc = ac_decode_piece(g->tok, g->last, next, &p, &n))) return rc;
    if ((rc = gen_match(g, p, n, piece, len))) return rc;
    ac_sampler_accept(g->sampler, next);
    g->last = next;
    g->filled++;
    g->n_reported++;
    *token = next;
    return AC_OK;
}

/* The stop rule applied right after a reported token: when it was the last one, the held
 * bytes go with it (appended to its piece, which they follow in the text buffer). */
static void gen_close_if_last(ac_generation *g, size_t *len) {
    const char *tail;
    size_t n_tail;
    if (g->stop == AC_STOP_NONE && ac_generation_ended(g, &tail, &n_tail)) *len += n_tail;
}

AC_API int ac_generation_create(const ac_model *m, const ac_tokenizer *tok, const ac_session_params *params,
                                ac_generation **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_generation_create: out is NULL");
    *out = NULL;
    if (!m || !tok) return ac_fail(AC_ERR_ARG, "ac_generation_create: model and tokenizer are required");
    ac_session_params p = params ? *params : ac_session_default_params();
    int rc = ac_check_vocab_match(m, tok);
    if (!rc) rc = ac_session_check_params(&p);
    if (!rc) rc = ac_generation_create_seeded(m, tok, &p, ac_resolve_seed(p.sampler.seed), out);
    return rc;
}

AC_API int ac_generation_set_stops(ac_generation *g, const char *const *stops, const size_t *lens, int n) {
    if (!g) return ac_fail(AC_ERR_ARG, "ac_generation_set_stops: generation is NULL");
    return set_stops(g, stops, lens, n);
}

AC_API int ac_generation_set_logit_bias(ac_generation *g, const int *ids, const float *biases, int n) {
    if (!g) return ac_fail(AC_ERR_ARG, "ac_generation_set_logit_bias: generation is NULL");
    return set_logit_bias(g, ids, biases, n);
}

AC_API int ac_generation_begin(ac_generation *g, const int *context, int n_context) {
    if (!g || n_context < 1 || !context)
        return ac_fail(AC_ERR_ARG, "ac_generation_begin: the context must hold a token at least");
    int seq_len = g->model->config.seq_len;
    if (n_context > seq_len)
        return ac_fail(AC_ERR_RANGE, "a context of %d tokens exceeds the model's seq_len %d", n_context, seq_len);
    int rc = ac_check_tokens(context, n_context, g->model->config.vocab_size);
    if (rc) return rc;
    ac_generation_reset(g);
    int window = g->params.sampler.repeat_last_n, from = n_context > window ? n_context - window : 0;
    ac_generation_continue(g, context + from, n_context - from, n_context);
    const char *piece;
    size_t len;
    ac_generation_ended(g, &piece, &len); /* nothing to sample: max_new_tokens 0 or a full context */
    return AC_OK;
}

AC_API int ac_generation_next(ac_generation *g, const float *logits, int *token, const char **piece,
                              size_t *len) {
    if (!g || !token || !piece || !len) return ac_fail(AC_ERR_ARG, "ac_generation_next: NULL argument");
    *token = -1;
    if (ac_generation_ended(g, piece, len)) return AC_OK;
    if (g->last < 0) return ac_fail(AC_ERR_ARG, "ac_generation_next: no context (call ac_generation_begin)");
    if (!logits) return ac_fail(AC_ERR_ARG, "ac_generation_next: logits is NULL");
    int rc = ac_generation_sample(g, logits, token, piece, len);
    if (!rc && *token >= 0) gen_close_if_last(g, len);
    return rc;
}

AC_API void ac_generation_cancel(ac_generation *g) {
    if (g && g->stop == AC_STOP_NONE) {
        g->stop = AC_STOP_CALLER;
        g->n_held = 0;
    }
}

AC_API ac_stop_reason ac_generation_stop_reason(const ac_generation *g) { return g ? g->stop : AC_STOP_NONE; }
