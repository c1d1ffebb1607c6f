/*
 * session.c - generation: its settings (defaults, checks) and its one stop rule, a session
 * (one sequence: feed text or tokens, then sample one token at a time), the generate loop
 * over it, and batched generation (N sequences sampled independently, each decode step one
 * forward pass for all of them).
 *
 * Sections, in order:
 *   settings  defaults, checks, seeds, and when a generation stops
 *   session   feed / next step API and the generate loop
 *   batch     N independent generations advanced together
 *   steps     a batch driven step by step by its caller (continuous batching)
 *
 * Every token a sequence's context gets (fed or sampled) is recorded in its sampler
 * (ac_sampler_accept), whose penalties look at the recent ones.
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

/* ======================================================================== session */

struct ac_session {
    const ac_model *model;
    const ac_tokenizer *tok;
    ac_state *state;
    ac_sampler *sampler;
    ac_session_params params;
    int pos;            /* positions already in the KV cache */
    int pending;        /* sampled but not yet run through the model, or -1 */
    int last;           /* the token at pos - 1 (or pending), for decoding; -1 at the start */
    int has_logits;     /* the state's logits belong to the token at pos - 1 */
    int n_reported;     /* tokens reported since the last feed (or new settings) */
    ac_stop_reason stop; /* why the generation ended; AC_STOP_NONE while it goes on */
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
    s->n_reported = 0;
    s->stop = AC_STOP_NONE;
}

AC_API int ac_session_set_params(ac_session *s, const ac_session_params *params) {
    if (!s || !params) return ac_fail(AC_ERR_ARG, "ac_session_set_params: NULL argument");
    int rc = ac_session_check_params(params);
    if (rc) return rc;
    ac_sampler *sampler;
    rc = make_sampler(params, resolve_seed(params->sampler.seed), s->model->config.vocab_size, &sampler);
    if (rc) return rc;
    if ((rc = ac_state_set_threads(s->state, params->n_threads))) {
        ac_sampler_free(sampler);
        return rc;
    }
    ac_sampler_free(s->sampler);
    s->sampler = sampler;
    s->params = *params;
    s->n_reported = 0;
    s->stop = AC_STOP_NONE;
    return AC_OK;
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
    s->params = p;
    rc = make_sampler(&p, resolve_seed(p.sampler.seed), m->config.vocab_size, &s->sampler);
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

AC_API ac_stop_reason ac_session_stop_reason(const ac_session *s) { return s ? s->stop : AC_STOP_NONE; }

/* Runs token at the next position; its logits replace the state's. */
static int run_token(ac_session *s, int token) {
    static const int seq = 0;
    int rc = ac_forward_step(s->state, &seq, &token, &s->pos, 1);
    if (rc) return rc;
    s->pos++;
    s->last = token;
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
        for (int i = 0; i < n_tokens; i++) ac_sampler_accept(s->sampler, tokens[i]);
        s->pos += n_tokens;
        s->last = tokens[n_tokens - 1];
        s->has_logits = 1;
    }
    s->n_reported = 0;
    s->stop = AC_STOP_NONE;
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
    if (s->stop != AC_STOP_NONE || (s->pending < 0 && !s->has_logits)) return AC_OK; /* or nothing fed */
    s->stop = limit_reached(&s->params, s->n_reported, s->pos + (s->pending >= 0), s->model->config.seq_len);
    if (s->stop != AC_STOP_NONE) return AC_OK;
    int rc, next;
    if (s->pending >= 0) {
        if ((rc = run_token(s, s->pending))) return rc;
        s->pending = -1;
    }
    if ((rc = ac_sample(s->sampler, ac_state_logits(s->state), &next))) return rc;
    if (ends_text(&s->params, next)) {
        s->stop = AC_STOP_END;
        return AC_OK;
    }
    const char *p;
    size_t n;
    if ((rc = ac_decode_piece(s->tok, s->last, next, &p, &n))) return rc;
    ac_sampler_accept(s->sampler, next);
    s->pending = next;
    s->n_reported++;
    *token = next;
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
        if ((rc = ac_session_next(s, &token, &piece, &piece_len)) || token < 0) break;
        n++;
        if (on_piece && on_piece(user, token, piece, piece_len)) {
            s->stop = AC_STOP_CALLER;
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
    ac_sampler **samplers; /* (n_seqs) sequence i samples with seed + i */
    int *pos;              /* (n_seqs) positions in each cache */
    int *active;           /* (n_seqs) the sequences of this step's rows, in row order */
    int *row_token;        /* (n_seqs) each row's token */
    int *row_pos;          /* (n_seqs) each row's position */
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
    b->samplers = calloc((size_t)n_seqs, sizeof *b->samplers);
    b->pos = calloc((size_t)n_seqs, sizeof *b->pos);
    b->active = calloc((size_t)n_seqs, sizeof *b->active);
    b->row_token = calloc((size_t)n_seqs, sizeof *b->row_token);
    b->row_pos = calloc((size_t)n_seqs, sizeof *b->row_pos);
    rc = (b->samplers && b->pos && b->active && b->row_token && b->row_pos)
             ? ac_state_create_seqs(m, n_seqs, p.n_threads, &b->state)
             : ac_fail(AC_ERR_NOMEM, "out of memory for the batch");
    uint64_t base = resolve_seed(p.sampler.seed);
    for (int i = 0; !rc && i < n_seqs; i++)
        rc = make_sampler(&p, base + (uint64_t)i, m->config.vocab_size, &b->samplers[i]);
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
    }
    for (int k = 0; !rc && k < n; k++) ac_sampler_accept(b->samplers[i], tokens[k]);
    free(tokens);
    return rc;
}

AC_API int ac_batch_generate(ac_batch *b, const char *const *prompts, const size_t *lens,
                             int *tokens, ac_batch_result *results) {
    int stride = ac_batch_max_tokens(b);
    if (!b || !prompts || !lens || (stride > 0 && !tokens) || !results)
        return ac_fail(AC_ERR_ARG, "ac_batch_generate: bad arguments");
    const ac_session_params *p = &b->params;
    int n = b->n_seqs, seq_len = b->model->config.seq_len;
    size_t V = (size_t)b->model->config.vocab_size;
    float *logits = ac_state_logits(b->state);
    int n_active = 0;
    for (int i = 0; i < n; i++) {
        ac_batch_result *r = &results[i];
        r->n_generated = 0;
        r->last_prompt_token = -1;
        int rc = batch_prefill(b, i, prompts[i], lens[i], logits + (size_t)n_active * V, r);
        if (rc) return rc;
        r->stop = limit_reached(p, 0, b->pos[i], seq_len);
        if (r->stop == AC_STOP_NONE) b->active[n_active++] = i;
    }
    /* Row r of the logits belongs to sequence active[r]: sample each, drop the sequences
     * that ended, and run the rest one position further, all in one forward pass. */
    while (n_active > 0) {
        int rows = 0;
        for (int row = 0; row < n_active; row++) {
            int i = b->active[row], token;
            ac_batch_result *r = &results[i];
            int rc = ac_sample(b->samplers[i], logits + (size_t)row * V, &token);
            if (rc) return rc;
            if (ends_text(p, token)) {
                r->stop = AC_STOP_END;
                continue;
            }
            ac_sampler_accept(b->samplers[i], token);
            tokens[(size_t)i * (size_t)stride + (size_t)r->n_generated++] = token;
            r->stop = limit_reached(p, r->n_generated, b->pos[i] + 1, seq_len);
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
