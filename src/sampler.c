/*
 * sampler.c - picking the next token from logits: greedy argmax at temperature 0, else a
 * draw from softmax(logits / temperature), optionally restricted to the top_k most likely
 * tokens, then to the top_p nucleus, then to min-p.  Before that, the logits may get a
 * logit bias and llama.cpp's repetition / presence / frequency penalties over a window of
 * recently recorded tokens.  The PRNG is a seeded xorshift64*, so a seed (and the same
 * recorded tokens) gives the same tokens on every platform.  Also: log-probabilities with the
 * top-N alternatives.
 */
#include "internal.h"

#include <math.h>
#include <stdlib.h>

struct ac_sampler {
    ac_sampler_params params;
    int vocab_size;
    uint64_t rng;   /* xorshift64* state, never 0 */
    float *probs;   /* (V) scratch */
    int *order;     /* (V) candidate ids, sorted by probability */
    int *order_tmp; /* (V) scratch of sort_by_prob */
    uint32_t *keys; /* (2V) scratch of sort_by_prob */
    float *adjusted; /* (V) the logits after bias and penalties, when either applies */
    float *bias;     /* (V) added to the logits (ac_sampler_set_logit_bias), or NULL */
    int *recent;     /* (repeat_last_n) ring of the last tokens recorded by ac_sampler_accept */
    int n_recent;    /* how many of them are held */
    int next_recent; /* where the next one goes */
    int *counts;     /* (V) occurrences of each token among the recent ones */
};

#define DEFAULT_SEED 0x9E3779B97F4A7C15ull

/* The defaults were picked on the shipped persona by a measured grid (scripts/sample_quality.py;
 * README "Command line" and persona/README.md give the numbers): greedy and plain sampling at
 * temperature 1 fall into loops that a mild repetition penalty over the last 64 tokens
 * removes, and temperature 0.8 invents fewer words than 1.0. */
AC_API ac_sampler_params ac_sampler_default_params(void) {
    ac_sampler_params p = {0.8f, 0.9f, 0, 0, 0.0f, 1.1f, 64, 0.0f, 0.0f};
    return p;
}

static int check_sampler_params(const ac_sampler_params *p) {
    if (isnan(p->temperature) || p->temperature < 0.0f)
        return ac_fail(AC_ERR_ARG, "temperature %g is invalid: it must be >= 0 (0 = greedy)",
                    (double)p->temperature);
    if (isnan(p->top_p) || !(p->top_p > 0.0f && p->top_p <= 1.0f))
        return ac_fail(AC_ERR_ARG, "top_p %g is invalid: it must be in (0, 1] (1 = off)", (double)p->top_p);
    if (p->top_k < 0)
        return ac_fail(AC_ERR_ARG, "top_k %d is invalid: it must be >= 0 (0 = off)", p->top_k);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return ac_fail(AC_ERR_ARG, "min_p %g is invalid: it must be in [0, 1] (0 = off)", (double)p->min_p);
    if (!(p->repeat_penalty >= 0.0f) || isinf(p->repeat_penalty))
        return ac_fail(AC_ERR_ARG, "repeat_penalty %g is invalid: it must be finite and >= 0 (1 or 0 = off)",
                    (double)p->repeat_penalty);
    if (p->repeat_last_n < 0 || p->repeat_last_n > AC_MAX_SEQ_LEN)
        return ac_fail(AC_ERR_ARG, "repeat_last_n %d is invalid: it must be in 0..%d (0 = no penalties)",
                    p->repeat_last_n, AC_MAX_SEQ_LEN);
    if (!isfinite(p->presence_penalty))
        return ac_fail(AC_ERR_ARG, "presence_penalty %g is invalid: it must be finite (0 = off)",
                    (double)p->presence_penalty);
    if (!isfinite(p->frequency_penalty))
        return ac_fail(AC_ERR_ARG, "frequency_penalty %g is invalid: it must be finite (0 = off)",
                    (double)p->frequency_penalty);
    return AC_OK;
}

AC_API int ac_sampler_check_params(const ac_sampler_params *params) {
    if (!params) return ac_fail(AC_ERR_ARG, "ac_sampler_check_params: params is NULL");
    return check_sampler_params(params);
}

AC_API int ac_sampler_create(const ac_sampler_params *params, int vocab_size, ac_sampler **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_sampler_create: out is NULL");
    *out = NULL;
    ac_sampler_params p = params ? *params : ac_sampler_default_params();
    int rc = check_sampler_params(&p);
    if (rc) return rc;
    if (vocab_size <= 0 || vocab_size > AC_MAX_VOCAB)
        return ac_fail(AC_ERR_ARG, "vocab_size %d is outside 1..%d", vocab_size, AC_MAX_VOCAB);
    ac_sampler *s = calloc(1, sizeof *s);
    if (!s) return ac_fail(AC_ERR_NOMEM, "out of memory for the sampler");
    s->params = p;
    s->vocab_size = vocab_size;
    s->rng = p.seed ? p.seed : DEFAULT_SEED;
    s->probs = malloc((size_t)vocab_size * sizeof *s->probs);
    s->order = malloc((size_t)vocab_size * sizeof *s->order);
    s->order_tmp = malloc((size_t)vocab_size * sizeof *s->order_tmp);
    s->keys = malloc(2 * (size_t)vocab_size * sizeof *s->keys);
    s->adjusted = malloc((size_t)vocab_size * sizeof *s->adjusted);
    s->counts = calloc((size_t)vocab_size, sizeof *s->counts);
    s->recent = p.repeat_last_n > 0 ? malloc((size_t)p.repeat_last_n * sizeof *s->recent) : NULL;
    if (!s->probs || !s->order || !s->order_tmp || !s->keys || !s->adjusted || !s->counts ||
        (p.repeat_last_n > 0 && !s->recent)) {
        ac_sampler_free(s);
        return ac_fail(AC_ERR_NOMEM, "out of memory for the sampler");
    }
    *out = s;
    return AC_OK;
}

AC_API void ac_sampler_free(ac_sampler *s) {
    if (!s) return;
    free(s->probs);
    free(s->order);
    free(s->order_tmp);
    free(s->keys);
    free(s->adjusted);
    free(s->bias);
    free(s->recent);
    free(s->counts);
    free(s);
}

AC_API int ac_sampler_set_logit_bias(ac_sampler *s, const int *ids, const float *biases, int n) {
    if (!s || n < 0 || (n > 0 && (!ids || !biases)))
        return ac_fail(AC_ERR_ARG, "ac_sampler_set_logit_bias: bad arguments");
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= s->vocab_size)
            return ac_fail(AC_ERR_RANGE, "logit bias token %d is outside the vocabulary [0, %d)", ids[i],
                        s->vocab_size);
        if (isnan(biases[i]) || biases[i] == INFINITY)
            return ac_fail(AC_ERR_ARG, "logit bias %g of token %d is invalid: it must be finite or -inf",
                        (double)biases[i], ids[i]);
    }
    if (n == 0) {
        free(s->bias);
        s->bias = NULL;
        return AC_OK;
    }
    if (!s->bias && !(s->bias = malloc((size_t)s->vocab_size * sizeof *s->bias)))
        return ac_fail(AC_ERR_NOMEM, "out of memory for the logit bias");
    for (int i = 0; i < s->vocab_size; i++) s->bias[i] = 0.0f;
    for (int i = 0; i < n; i++) s->bias[ids[i]] += biases[i];
    return AC_OK;
}

AC_API int ac_sampler_accept(ac_sampler *s, int token) {
    if (!s) return ac_fail(AC_ERR_ARG, "ac_sampler_accept: sampler is NULL");
    if (token < 0 || token >= s->vocab_size)
        return ac_fail(AC_ERR_RANGE, "token %d is outside the vocabulary [0, %d)", token, s->vocab_size);
    int window = s->params.repeat_last_n;
    if (window == 0) return AC_OK;
    if (s->n_recent == window) s->counts[s->recent[s->next_recent]]--; /* the oldest leaves */
    else s->n_recent++;
    s->recent[s->next_recent] = token;
    s->counts[token]++;
    s->next_recent = (s->next_recent + 1) % window;
    return AC_OK;
}

void ac_sampler_copy_history(ac_sampler *to, const ac_sampler *from) {
    int window = from->params.repeat_last_n;
    int oldest = from->n_recent == window ? from->next_recent : 0;
    for (int i = 0; i < from->n_recent; i++) ac_sampler_accept(to, from->recent[(oldest + i) % window]);
}

AC_API void ac_sampler_reset_history(ac_sampler *s) {
    if (!s) return;
    for (int i = 0; i < s->n_recent; i++) s->counts[s->recent[i]] = 0;
    s->n_recent = 0;
    s->next_recent = 0;
}

/* xorshift64*: small, fast and identical on every platform. */
static uint64_t rng_next(uint64_t *state) {
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

/* Uniform in [0, 1), from the top 24 bits (exactly representable in a float). */
static float rng_float(uint64_t *state) { return (float)(rng_next(state) >> 40) / 16777216.0f; }

/* First index of the largest value; NaNs never win (0 when all are NaN).  The largest value
 * comes first, from 8 running maxima that the compiler vectorises (a NaN fails every comparison,
 * so it never enters one), then its first index: 3.5x the speed of one pass that tracks the
 * index as it goes (4,096 logits; greedy decoding runs it once per token). */
#define ARGMAX_LANES 8
static int argmax(const float *x, int n) {
    float lane[ARGMAX_LANES];
    for (int k = 0; k < ARGMAX_LANES; k++) lane[k] = -INFINITY;
    int i = 0;
    for (; i + ARGMAX_LANES <= n; i += ARGMAX_LANES)
        for (int k = 0; k < ARGMAX_LANES; k++) lane[k] = x[i + k] > lane[k] ? x[i + k] : lane[k];
    float top = -INFINITY;
    for (; i < n; i++) top = x[i] > top ? x[i] : top;
    for (int k = 0; k < ARGMAX_LANES; k++) top = lane[k] > top ? lane[k] : top;
    for (i = 0; i < n; i++)
        if (x[i] == top) return i; /* -0 == +0: the first zero of either sign, as a single pass */
    return 0;                      /* every value NaN */
}

/* Sorts the candidates s->order[0..n) by descending probability, equal probabilities in
 * increasing id order (so the top candidate agrees with argmax).  The ids arrive in
 * increasing order and this is a stable LSD radix sort on the bits of the probabilities,
 * which (for the non-negative, non-NaN floats of candidates) order like the floats: ~bits
 * ascending is probability descending.  It replaced qsort with a comparison callback, which
 * took ~13% of int8 decode time with the default top-p (the persona keeps hundreds to
 * thousands of candidates per token): int8 decode 1.15x, batched decode 1.22x (measured). */
static void sort_by_prob(ac_sampler *s, int n) {
    if (n < 2) return;
    int *ids = s->order, *ids_out = s->order_tmp;
    uint32_t *key = s->keys, *key_out = s->keys + n;
    for (int i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &s->probs[ids[i]], sizeof bits);
        key[i] = ~bits;
    }
    for (int shift = 0; shift < 32; shift += 8) {
        int start[257] = {0};
        for (int i = 0; i < n; i++) start[((key[i] >> shift) & 255) + 1]++;
        if (start[((key[0] >> shift) & 255) + 1] == n) continue; /* one digit value: order kept */
        for (int d = 0; d < 256; d++) start[d + 1] += start[d];
        for (int i = 0; i < n; i++) {
            int at = start[(key[i] >> shift) & 255]++;
            key_out[at] = key[i];
            ids_out[at] = ids[i];
        }
        uint32_t *key_in = key;
        key = key_out;
        key_out = key_in;
        int *ids_in = ids;
        ids = ids_out;
        ids_out = ids_in;
    }
    if (ids != s->order) memcpy(s->order, ids, (size_t)n * sizeof *ids);
}

/* Walks candidates ids[0..n) with weights probs[id] until the cumulative weight passes r. */
static int pick(const float *probs, const int *ids, int n, float r) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        int id = ids ? ids[i] : i;
        cdf += probs[id];
        if (r < cdf) return id;
    }
    return ids ? ids[n - 1] : n - 1; /* rounding left r just above the total */
}

/* Whether the repetition penalties change anything: a window with recorded tokens and a
 * penalty that is not neutral. */
static int penalties_apply(const ac_sampler *s) {
    const ac_sampler_params *p = &s->params;
    int repeat = p->repeat_penalty != 1.0f && p->repeat_penalty != 0.0f;
    return s->n_recent > 0 && (repeat || p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f);
}

/* The logits the sampler draws from: the model's, plus the logit bias, with the penalties
 * of llama.cpp on every token seen in the window (a positive logit divided by
 * repeat_penalty, a negative one multiplied by it; then count * frequency_penalty and
 * presence_penalty subtracted).  The model's own when neither applies, so settings at their
 * defaults leave every draw exactly as it was. */
static const float *adjusted_logits(ac_sampler *s, const float *logits) {
    int penalize = penalties_apply(s);
    if (!s->bias && !penalize) return logits;
    const ac_sampler_params *p = &s->params;
    int V = s->vocab_size;
    float *x = s->adjusted;
    for (int i = 0; i < V; i++) x[i] = s->bias ? logits[i] + s->bias[i] : logits[i];
    if (!penalize) return x;
    float repeat = p->repeat_penalty == 0.0f ? 1.0f : p->repeat_penalty;
    for (int i = 0; i < V; i++) {
        int n = s->counts[i];
        if (n == 0) continue;
        x[i] = x[i] <= 0.0f ? x[i] * repeat : x[i] / repeat;
        x[i] -= (float)n * p->frequency_penalty + p->presence_penalty;
    }
    return x;
}

/* min-p: how many of the n sorted candidates have a logit within log(min_p) of the best
 * one, i.e. a probability at least min_p times the best one's before temperature (as
 * llama.cpp's min-p sampler, which comes before its temperature).  The log is taken in
 * double and rounded once: logf's last bit differs between C libraries, this does not (and
 * it is what the NumPy reference computes). */
static int min_p_keep(const ac_sampler *s, const float *x, int n) {
    float floor = x[s->order[0]] + (float)log((double)s->params.min_p);
    int keep = 1;
    while (keep < n && x[s->order[keep]] >= floor) keep++;
    return keep;
}

AC_API int ac_sample(ac_sampler *s, const float *logits, int *token) {
    if (!s || !logits || !token) return ac_fail(AC_ERR_ARG, "ac_sample: NULL argument");
    int V = s->vocab_size;
    const ac_sampler_params *p = &s->params;
    const float *x = adjusted_logits(s, logits);
    if (p->temperature == 0.0f) {
        *token = argmax(x, V);
        return AC_OK;
    }
    float *probs = s->probs;
    for (int i = 0; i < V; i++) probs[i] = x[i] / p->temperature;
    if (!isfinite(ac_softmax(probs, V))) {
        /* a temperature so small that logits / temperature overflow (whose limit is greedy
         * decoding), or NaN logits from a corrupt model: greedy, never an arbitrary token */
        *token = argmax(x, V);
        return AC_OK;
    }
    float coin = rng_float(&s->rng);
    int use_k = p->top_k > 0 && p->top_k < V, use_p = p->top_p < 1.0f, use_min_p = p->min_p > 0.0f;
    /* a -inf bias gives probability 0: such a token must never be a candidate */
    int banned = s->bias != NULL;
    if (!use_k && !use_p && !use_min_p && !banned) {
        *token = pick(probs, NULL, V, coin);
        return AC_OK;
    }
    /* Candidates.  With top-p alone, a token below (1 - p) / (V - 1) can never be in the
     * nucleus (all such tokens together hold less than 1 - p), so skip sorting them. */
    float cutoff = (!use_k && use_p && V > 1) ? (1.0f - p->top_p) / (float)(V - 1) : 0.0f;
    int n = 0;
    for (int i = 0; i < V; i++)
        if (probs[i] >= cutoff && (!banned || probs[i] > 0.0f)) s->order[n++] = i;
    if (n == 0) { /* only if every probability is NaN (or zero): fall back to greedy */
        *token = argmax(x, V);
        return AC_OK;
    }
    sort_by_prob(s, n);
    if (use_k && n > p->top_k) n = p->top_k;
    float total = 0.0f;
    for (int i = 0; i < n; i++) total += probs[s->order[i]];
    if (use_p) {
        /* the smallest prefix whose mass exceeds top_p: of the top-k mass after top-k (as
         * llama.cpp and Hugging Face renormalize), else of the whole distribution (1): the
         * tokens the cutoff skipped still count in it */
        float whole = use_k ? total : 1.0f;
        float cum = 0.0f, mass = 0.0f;
        int keep = n;
        for (int i = 0; i < n; i++) {
            cum += probs[s->order[i]] / whole;
            mass += probs[s->order[i]];
            if (cum > p->top_p) {
                keep = i + 1;
                break;
            }
        }
        if (keep < n) total = mass;
        n = keep;
    }
    if (use_min_p) {
        int keep = min_p_keep(s, x, n);
        if (keep < n) {
            total = 0.0f;
            for (int i = 0; i < keep; i++) total += probs[s->order[i]];
            n = keep;
        }
    }
    *token = pick(probs, s->order, n, coin * total);
    return AC_OK;
}

AC_API int ac_logprobs(const float *logits, int n_vocab, int token, int top_n, float *token_logprob,
                       int *top_ids, float *top_logprobs) {
    if (!logits || n_vocab <= 0 || top_n < 0 || top_n > n_vocab || (top_n > 0 && (!top_ids || !top_logprobs)))
        return ac_fail(AC_ERR_ARG, "ac_logprobs: bad arguments (n_vocab=%d, top_n=%d)", n_vocab, top_n);
    if (token_logprob && (token < 0 || token >= n_vocab))
        return ac_fail(AC_ERR_RANGE, "token %d is outside the vocabulary [0, %d)", token, n_vocab);
    float max = -INFINITY;
    for (int i = 0; i < n_vocab; i++) {
        if (isnan(logits[i]) || logits[i] == INFINITY)
            return ac_fail(AC_ERR_RANGE, "logit %d is %g: log-probabilities need finite logits", i,
                        (double)logits[i]);
        if (logits[i] > max) max = logits[i];
    }
    if (max == -INFINITY) /* probabilities 0 / 0: no distribution */
        return ac_fail(AC_ERR_RANGE, "every logit is -inf: log-probabilities need a finite logit");
    double sum = 0.0; /* in double: 2^24 terms of float would lose the small ones */
    for (int i = 0; i < n_vocab; i++) sum += exp((double)logits[i] - (double)max);
    double log_total = (double)max + log(sum);
    if (token_logprob) *token_logprob = (float)((double)logits[token] - log_total);
    /* the top_n largest by insertion: higher first, equal ones in increasing id order */
    int have = 0;
    for (int i = 0; i < n_vocab && top_n > 0; i++) {
        float v = logits[i];
        if (have == top_n && !(v > logits[top_ids[have - 1]])) continue;
        int at = have < top_n ? have++ : top_n - 1;
        while (at > 0 && v > logits[top_ids[at - 1]]) {
            top_ids[at] = top_ids[at - 1];
            at--;
        }
        top_ids[at] = i;
    }
    for (int i = 0; i < top_n; i++) top_logprobs[i] = (float)((double)logits[top_ids[i]] - log_total);
    return AC_OK;
}
