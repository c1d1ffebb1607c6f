/*
 * fuzz_sampler.c - libFuzzer harness for the sampler's settings: min-p, the repetition /
 * presence / frequency penalties over a window of recorded tokens, the logit bias (-inf bans),
 * and ac_logprobs, on logits and histories taken from the input.
 *
 * Input: 8 settings bytes, then a stream of operations (2 bytes each): record a token
 * (ac_sampler_accept) or draw one from logits built from the following bytes.  Checked:
 * parameter validation agrees between ac_sampler_check_params and ac_sampler_create; every
 * draw is a token id, never a banned one while another is allowed; greedy draws are the argmax
 * of the logits after bias and penalties as this file recomputes them; min-p never keeps a
 * token below min_p times the best one's probability; two samplers fed the same input draw
 * the same tokens; log-probabilities are <= 0, sorted, and the argmax's is the top one's.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "run.h"

#define MAX_V 64
#define SETTINGS 8

static const float TEMPERATURES[8] = {0.0f, 0.0f, 0.5f, 1.0f, 1.0f, 1.7f, 1e-30f, 3.0f};
static const float TOP_PS[4] = {1.0f, 0.9f, 0.5f, 0.05f};
static const float MIN_PS[8] = {0.0f, 0.0f, 0.05f, 0.1f, 0.5f, 0.99f, 1.0f, 0.2f};
static const float REPEAT[8] = {1.0f, 0.0f, 1.1f, 1.5f, 0.5f, 1e6f, 2.0f, 1.0f};
static const float PRESENCE[8] = {0.0f, 0.0f, 0.5f, -0.5f, 2.0f, 0.1f, 10.0f, -2.0f};
static const float LOGITS[16] = {0.0f, 1.0f, -1.0f, 2.5f, -3.0f, 0.5f, 10.0f, -10.0f,
                                 1e30f, -1e30f, 0.25f, 4.0f, -0.125f, 7.0f, 3.0f, 1e-3f};

static void fail(const char *what) {
    fprintf(stderr, "fuzz_sampler: %s\n", what);
    abort();
}

typedef struct {
    ac_sampler_params p;
    int V, n_bias;
    int bias_ids[8];
    float bias[8];
} settings;

static settings parse(const uint8_t *h) {
    settings s;
    s.p = ac_sampler_default_params();
    s.V = 2 + h[0] % (MAX_V - 1);
    s.p.temperature = TEMPERATURES[h[1] & 7];
    s.p.top_p = TOP_PS[(h[1] >> 3) & 3];
    s.p.top_k = (h[1] >> 5) == 7 ? s.V + 3 : (h[1] >> 5);
    s.p.min_p = MIN_PS[h[2] & 7];
    s.p.repeat_penalty = REPEAT[(h[2] >> 3) & 7];
    s.p.repeat_last_n = h[3] % 24;
    s.p.presence_penalty = PRESENCE[h[4] & 7];
    s.p.frequency_penalty = PRESENCE[(h[4] >> 3) & 7];
    s.p.seed = h[5];
    s.n_bias = h[6] % 9;
    for (int i = 0; i < s.n_bias; i++) {
        s.bias_ids[i] = (h[7] + 7 * i) % s.V;
        s.bias[i] = (h[7] >> (i % 8)) & 1 ? -INFINITY : LOGITS[(h[6] + i) & 15] / 8.0f;
    }
    return s;
}

/* The logits the sampler should draw from, recomputed here from its documented rules. */
static void adjusted(const settings *s, const float *logits, const int *counts, int n_recent, float *x) {
    float bias[MAX_V] = {0};
    for (int i = 0; i < s->n_bias; i++) bias[s->bias_ids[i]] += s->bias[i];
    for (int i = 0; i < s->V; i++) x[i] = s->n_bias ? logits[i] + bias[i] : logits[i];
    const ac_sampler_params *p = &s->p;
    int repeat = p->repeat_penalty != 1.0f && p->repeat_penalty != 0.0f;
    if (n_recent == 0 || !(repeat || p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f)) return;
    float r = repeat ? p->repeat_penalty : 1.0f;
    for (int i = 0; i < s->V; i++) {
        if (counts[i] == 0) continue;
        x[i] = x[i] <= 0.0f ? x[i] * r : x[i] / r;
        x[i] -= (float)counts[i] * p->frequency_penalty + p->presence_penalty;
    }
}

static int first_max(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static void check_logprobs(const float *logits, int V, int token) {
    int ids[MAX_V];
    float lps[MAX_V], lp;
    if (ac_logprobs(logits, V, token, V, &lp, ids, lps) != AC_OK) fail("ac_logprobs failed on finite logits");
    if (!(lp <= 0.0f)) fail("a log-probability above 0");
    for (int i = 1; i < V; i++)
        if (lps[i] > lps[i - 1] || (lps[i] == lps[i - 1] && logits[ids[i]] == logits[ids[i - 1]] && ids[i] < ids[i - 1]))
            fail("top log-probabilities out of order");
    if (ids[0] != first_max(logits, V)) fail("the top log-probability is not the argmax's");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < SETTINGS) return 0;
    settings s = parse(data);
    int V = s.V;
    if (ac_sampler_check_params(&s.p) != AC_OK) fail("valid settings refused");
    ac_sampler *a = NULL, *b = NULL;
    if (ac_sampler_create(&s.p, V, &a) || ac_sampler_create(&s.p, V, &b)) fail("ac_sampler_create failed");
    if (s.n_bias && (ac_sampler_set_logit_bias(a, s.bias_ids, s.bias, s.n_bias) ||
                     ac_sampler_set_logit_bias(b, s.bias_ids, s.bias, s.n_bias)))
        fail("ac_sampler_set_logit_bias failed");
    int counts[MAX_V] = {0}, ring[32], n_recent = 0, next = 0, window = s.p.repeat_last_n;
    float banned[MAX_V] = {0};
    for (int i = 0; i < s.n_bias; i++)
        if (isinf(s.bias[i])) banned[s.bias_ids[i]] = 1;
    int allowed = 0;
    for (int i = 0; i < V; i++) allowed += !banned[i];
    const uint8_t *op = data + SETTINGS, *end = data + size;
    while (end - op >= 2) {
        int kind = op[0] & 1, value = op[1];
        op += 2;
        if (kind == 0) { /* record a token */
            int t = value % V;
            if (ac_sampler_accept(a, t) || ac_sampler_accept(b, t)) fail("ac_sampler_accept failed");
            if (window > 0) {
                if (n_recent == window) counts[ring[next]]--;
                else n_recent++;
                ring[next] = t;
                counts[t]++;
                next = (next + 1) % window;
            }
            continue;
        }
        float logits[MAX_V], x[MAX_V];
        for (int i = 0; i < V; i++) logits[i] = LOGITS[(op < end ? *op++ : i) & 15] + (float)(value % 7) * 0.01f * (float)i;
        int ta, tb;
        if (ac_sample(a, logits, &ta) || ac_sample(b, logits, &tb)) fail("ac_sample failed");
        if (ta != tb) fail("two samplers fed the same input drew different tokens");
        if (ta < 0 || ta >= V) fail("a token outside the vocabulary");
        if (banned[ta] && allowed > 0) fail("a banned token was drawn");
        adjusted(&s, logits, counts, n_recent, x);
        if (s.p.temperature == 0.0f && ta != first_max(x, V)) fail("greedy is not the argmax of the adjusted logits");
        if (s.p.min_p > 0.0f && s.p.temperature >= 0.5f && !banned[first_max(x, V)]) {
            float best = x[first_max(x, V)];
            if (isfinite(best) && fabsf(best) < 1e29f && x[ta] < best + logf(s.p.min_p) - 1e-4f)
                fail("min-p kept a token below min_p x the best one");
        }
        check_logprobs(logits, V, ta);
    }
    ac_sampler_free(a);
    ac_sampler_free(b);
    return 0;
}
