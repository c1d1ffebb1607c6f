/*
 * session.c - generation: its settings (defaults, checks) and its one stop rule, a session
 * (one sequence: feed text or tokens, then sample one token at a time), the generate loop
 * over it, and batched generation (N sequences sampled independently, each decode step one
 * forward pass for all of them).
 *
 * Sections, in order:
 *   settings    defaults, checks, seeds, and when a generation stops
 *   generation  one generation's sampler, stop rule and stop strings, whoever runs the model
 *   session     feed / next step API and the generate loop
 *   batch       N independent generations advanced together
 *   steps       a batch driven step by step by its caller (continuous batching)
 *
 * Every token a sequence's context gets (fed or sampled) is recorded in its sampler
 * (ac_sampler_accept), whose penalties look at the recent ones.  Stop strings are matched on
 * the decoded bytes: bytes that may start one are held back until they cannot, and dropped
 * when it completes, so no front end ever shows part of a stop string.
 */
#include "internal.h"

#include <limits.h>
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

/* The seed a sampler starts from: the given one, or for AC_SEED_RANDOM a fresh one from the
 * clock and a process-wide counter (so sessions created in the same instant still differ),
 * mixed by splitmix64's finalizer. */
static uint64_t resolve_seed(uint64_t seed) {
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

/* A session or batch pairs a model with a tokenizer of the same vocabulary. */
static int check_vocab_match(const ac_model *m, const ac_tokenizer *tok) {
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

/* One generation's rules, whoever runs the model: the sampler, the stop rule, the stop
 * strings and the text they hold back.  A session owns one, a batch one per sequence, and a
 * caller that runs the model itself (continuous batching) creates its own. */
struct ac_generation {
    const ac_model *model;
    const ac_tokenizer *tok;
    ac_session_params params;
    ac_sampler *sampler;
    int *bias_ids;       /* (n_bias) the logit bias, given again to every new sampler */
    float *bias_values;
    int n_bias;
    char *stop_bytes;    /* the stop strings, one after another */
    size_t *stop_len;    /* (n_stops) their lengths */
    int n_stops;
    char *text;          /* text[held_at..held_at+n_held): bytes that may start a stop string */
    size_t text_cap, held_at, n_held;
    int last;            /* the context's last token (the previous one when decoding); -1 none */
    int filled;          /* positions the context takes, sampled tokens included */
    int n_reported;      /* tokens reported since the generation began */
    ac_stop_reason stop; /* why it ended; AC_STOP_NONE while it goes on */
};

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

/* A new sampler for params (seed resolved here), with the logit bias given to it. */
static int gen_new_sampler(ac_generation *g, const ac_session_params *p, uint64_t seed) {
    ac_sampler *sampler;
    int rc = make_sampler(p, seed, g->model->config.vocab_size, &sampler);
    if (!rc && g->n_bias > 0) rc = ac_sampler_set_logit_bias(sampler, g->bias_ids, g->bias_values, g->n_bias);
    if (rc) {
        ac_sampler_free(sampler);
        return rc;
    }
    ac_sampler_free(g->sampler);
    g->sampler = sampler;
    return AC_OK;
}

/* A generation for params (already checked), its sampler seeded with seed. */
static int gen_create(const ac_model *m, const ac_tokenizer *tok, const ac_session_params *p, uint64_t seed,
                      ac_generation **out) {
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

/* New settings: a new sampler (the logit bias and stop strings stay), the count starts again. */
static int gen_set_params(ac_generation *g, const ac_session_params *p) {
    int rc = gen_new_sampler(g, p, resolve_seed(p->sampler.seed));
    if (rc) return rc;
    g->params = *p;
    g->n_reported = 0;
    g->stop = AC_STOP_NONE;
    return AC_OK;
}

/* Forgets the context. */
static void gen_reset(ac_generation *g) {
    ac_sampler_reset_history(g->sampler);
    g->last = -1;
    g->filled = 0;
    g->n_reported = 0;
    g->n_held = 0;
    g->stop = AC_STOP_NONE;
}

/* tokens[0..n) joined the context (now `filled` positions long): the penalties see them, and
 * a new generation starts after them. */
static void gen_continue(ac_generation *g, const int *tokens, int n, int filled) {
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

/* The stop rule before sampling: returns 1 (and releases the held bytes) when the generation
 * has ended or ends now. */
static int gen_ended(ac_generation *g, const char **piece, size_t *len) {
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
    if (n > g->text_cap) {
        char *grown = realloc(g->text, n);
        if (!grown) return ac_fail(AC_ERR_NOMEM, "out of memory for the generated text");
        g->text = grown;
        g->text_cap = n;
    }
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

/* Samples the next token from logits (those after the context's last token).  A token that
 * ends the text (BOS/EOS) is not reported: *token is -1 and the held bytes are released. */
static int gen_sample(ac_generation *g, const float *logits, int *token, const char **piece, size_t *len) {
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
    if (g->stop == AC_STOP_NONE && gen_ended(g, &tail, &n_tail)) *len += n_tail;
}

AC_API int ac_generation_create(const ac_model *m, const ac_tokenizer *tok, const ac_session_params *params,
                                ac_generation **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_generation_create: out is NULL");
    *out = NULL;
    if (!m || !tok) return ac_fail(AC_ERR_ARG, "ac_generation_create: model and tokenizer are required");
    ac_session_params p = params ? *params : ac_session_default_params();
    int rc = check_vocab_match(m, tok);
    if (!rc) rc = ac_session_check_params(&p);
    if (!rc) rc = gen_create(m, tok, &p, resolve_seed(p.sampler.seed), out);
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
    gen_reset(g);
    int window = g->params.sampler.repeat_last_n, from = n_context > window ? n_context - window : 0;
    gen_continue(g, context + from, n_context - from, n_context);
    const char *piece;
    size_t len;
    gen_ended(g, &piece, &len); /* nothing to sample: max_new_tokens 0 or a full context */
    return AC_OK;
}

AC_API int ac_generation_next(ac_generation *g, const float *logits, int *token, const char **piece,
                              size_t *len) {
    if (!g || !token || !piece || !len) return ac_fail(AC_ERR_ARG, "ac_generation_next: NULL argument");
    *token = -1;
    if (gen_ended(g, piece, len)) return AC_OK;
    if (g->last < 0) return ac_fail(AC_ERR_ARG, "ac_generation_next: no context (call ac_generation_begin)");
    if (!logits) return ac_fail(AC_ERR_ARG, "ac_generation_next: logits is NULL");
    int rc = gen_sample(g, logits, token, piece, len);
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

/* ======================================================================== session */

struct ac_session {
    const ac_model *model;
    const ac_tokenizer *tok;
    ac_state *state;
    ac_generation *gen; /* sampler, stop rule, stop strings; its context is the cache's + pending */
    int pos;            /* positions already in the KV cache */
    int pending;        /* sampled but not yet run through the model, or -1 */
    int has_logits;     /* the state's logits belong to the token at pos - 1 */
};

AC_API void ac_session_free(ac_session *s) {
    if (!s) return;
    ac_state_free(s->state);
    ac_generation_free(s->gen);
    free(s);
}

AC_API void ac_session_reset(ac_session *s) {
    if (!s) return;
    s->pos = 0;
    s->pending = -1;
    s->has_logits = 0;
    gen_reset(s->gen);
}

AC_API int ac_session_set_params(ac_session *s, const ac_session_params *params) {
    if (!s || !params) return ac_fail(AC_ERR_ARG, "ac_session_set_params: NULL argument");
    int rc = ac_session_check_params(params);
    if (!rc) rc = ac_state_set_threads(s->state, params->n_threads);
    if (!rc) rc = gen_set_params(s->gen, params);
    return rc;
}

AC_API int ac_session_set_stops(ac_session *s, const char *const *stops, const size_t *lens, int n) {
    if (!s) return ac_fail(AC_ERR_ARG, "ac_session_set_stops: session is NULL");
    return set_stops(s->gen, stops, lens, n);
}

AC_API int ac_session_set_logit_bias(ac_session *s, const int *ids, const float *biases, int n) {
    if (!s) return ac_fail(AC_ERR_ARG, "ac_session_set_logit_bias: session is NULL");
    return set_logit_bias(s->gen, ids, biases, n);
}

AC_API int ac_session_create(const ac_model *m, const ac_tokenizer *tok,
                             const ac_session_params *params, ac_session **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_session_create: out is NULL");
    *out = NULL;
    if (!m || !tok) return ac_fail(AC_ERR_ARG, "ac_session_create: model and tokenizer are required");
    ac_session_params p = params ? *params : ac_session_default_params();
    int rc = check_vocab_match(m, tok);
    if (!rc) rc = ac_session_check_params(&p);
    if (rc) return rc;
    ac_session *s = calloc(1, sizeof *s);
    if (!s) return ac_fail(AC_ERR_NOMEM, "out of memory for the session");
    s->model = m;
    s->tok = tok;
    rc = gen_create(m, tok, &p, resolve_seed(p.sampler.seed), &s->gen);
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
    gen_continue(s->gen, tokens, n_tokens, s->pos);
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
    if (gen_ended(s->gen, &p, &n)) {
        if (piece) *piece = p;
        if (len) *len = n;
        return AC_OK;
    }
    int rc;
    if (s->pending >= 0) {
        if ((rc = run_token(s, s->pending))) return rc;
        s->pending = -1;
    }
    if ((rc = gen_sample(s->gen, ac_state_logits(s->state), token, &p, &n))) return rc;
    if (*token >= 0) s->pending = *token;
    if (piece) *piece = p;
    if (len) *len = n;
    return AC_OK;
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
    int rc = check_vocab_match(m, tok);
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
    uint64_t base = resolve_seed(p.sampler.seed);
    for (int i = 0; !rc && i < n_seqs; i++)
        rc = gen_create(m, tok, &p, base + (uint64_t)i, &b->gens[i]);
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
        gen_reset(b->gens[i]);
        gen_continue(b->gens[i], tokens, n, n);
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
        if (!gen_ended(b->gens[i], &piece, &len)) b->active[n_active++] = i;
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
            int rc = gen_sample(g, logits + (size_t)row * V, &token, &piece, &len);
            if (rc) return rc;
            r->text_len += len;
            if (token >= 0) {
                tokens[(size_t)i * (size_t)stride + (size_t)r->n_generated++] = token;
                if (g->stop == AC_STOP_NONE && gen_ended(g, &piece, &len)) r->text_len += len;
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
        int rc = set_stops(b->gens[i], stops, lens, n);
        if (rc) return rc;
    }
    return AC_OK;
}

AC_API int ac_batch_set_logit_bias(ac_batch *b, const int *ids, const float *biases, int n) {
    if (!b) return ac_fail(AC_ERR_ARG, "ac_batch_set_logit_bias: batch is NULL");
    for (int i = 0; i < b->n_seqs; i++) {
        int rc = set_logit_bias(b->gens[i], ids, biases, n);
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
