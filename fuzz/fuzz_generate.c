/*
 * fuzz_generate.c - libFuzzer harness: sessions, batched generation and the sampler on
 * arbitrary prompts and settings.
 *
 * At start-up a tokenizer (printable ASCII, a few merges and byte pieces; the other bytes
 * become <unk>) and two tiny float32 models with random weights are built in memory, and
 * each is quantized to int8 once (4 models, picked per input):
 *   0  "ak42" v1, dim 16, hidden 32, 2 layers, 2 heads, 1 kv head (GQA), seq_len 24,
 *      separate classifier
 *   1  model 0 in int8, group size 16 (the portable int8 kernel)
 *   2  legacy v0, dim 32, hidden 64, 1 layer, 4 heads, 2 kv heads, shared classifier,
 *      seq_len 72 (a prompt can be longer than one 64-row prefill block)
 *   3  model 2 in int8, group size 32 (the AVX2 int8 kernel where available)
 * The rows of BOS/EOS in the classifiers are scaled up so that the model ends texts now
 * and then.
 *
 * Input: HEADER_BYTES of settings (missing bytes read as 0), then the prompt bytes, split
 * into the n_seqs prompts at the separator byte (the last prompt keeps the rest; missing
 * prompts are empty).  Settings:
 *   byte 0   bits 0-1 n_seqs - 1, bit 2 threads - 1, bit 3 ignore_eos, bits 4-5 model,
 *            bit 6 also drive a session by hand (ac_session_feed / ac_session_next),
 *            bit 7 pass NULL as the batch's token buffer (AC_ERR_ARG unless max_new_tokens <= 0)
 *   byte 1   max_new_tokens: byte % 41 (0..40), bytes 246..255 give -1..-10 (invalid)
 *   byte 2   bits 0-3 temperature (table, some invalid), bits 4-7 callback stop:
 *            12..15 make the ac_generate callback return 1 after 1, 4, 7, 10 tokens
 *   byte 3   top_p (table of 16, some invalid)
 *   byte 4-5 top_k: mode in byte 4 bits 5-7 (off, small, any 0..V+3, around V, huge,
 *            negative = invalid), value from the rest
 *   byte 6-9 seed (little-endian uint32); byte 9 = 0xFF: UINT64_MAX - 1 - (byte 6 & 3), so
 *            that seed + i wraps to 0 (the default seed) in the batch, or is AC_SEED_RANDOM
 *            (a session then draws a random seed: that sequence is not compared)
 *   byte 10  prompt separator
 *   byte 11  bits 0-5 how many prompt bytes the direct ac_sample check reads as logits
 *
 * Checked (abort on violation): result codes are AC_OK or the documented error (AC_ERR_ARG
 * for bad sampler settings and a negative max_new_tokens, from every entry that takes
 * settings, AC_ERR_RANGE for a prompt longer than seq_len) with a message; every token is in [0, vocab); every reported piece is the
 * ac_decode_piece() of its token after the previous one; counts never exceed max_new_tokens
 * nor the room left in seq_len, and equal min(max_new_tokens, room) with ignore_eos; BOS/EOS
 * are never reported without ignore_eos; the stop reason fits the count (AC_STOP_LENGTH at
 * max_new_tokens, AC_STOP_CONTEXT at the end of the room, AC_STOP_CALLER when the callback
 * stopped it); the hand-driven session reports the same tokens and stop as ac_generate (with
 * the other thread count) and keeps ac_session_position() consistent; batch sequence i
 * reports the same tokens and stop as ac_generate with seed + i (all temperatures: run.h
 * promises the same tokens); a direct ac_sample on odd logits (NaN, inf, huge) returns a
 * token in range, deterministically, without modifying the logits, and the first maximum
 * (never a NaN) when greedy.  Everything is freed (leak detection is on).
 */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_buf.h"
#include "run.h"

#define HEADER_BYTES 12
#define MAX_INPUT_BYTES 4096
#define MAX_NEW 40

static void fuzz_assert(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "fuzz_generate: invariant failed: %s (last error: %s)\n", what, ac_last_error());
        abort();
    }
}

/* A failed call must leave a message. */
static void expect_rc(int rc, int expected, const char *what) {
    if (rc != expected) {
        fprintf(stderr, "fuzz_generate: %s returned %d (%s), expected %d (%s)\n", what, rc,
                ac_strerror(rc), expected, ac_strerror(expected));
        fuzz_assert(0, what);
    }
    if (rc != AC_OK) fuzz_assert(ac_last_error()[0] != '\0', "a failure leaves a message");
}

/* ------------------------------------------------------------------ tokenizer */

static const char *const MERGES[] = {" t", "th", "he", " the", "in", "er",
                                      " a", "an", "\xc3\xa9", "\n\n", "  "};

static ac_tokenizer *build_tokenizer(void) {
    fuzz_buf b = {0};
    fuzz_tokenizer_start(&b);
    for (int v = 0; v < 256; v++) { /* some byte pieces: other bytes become <unk> */
        if (v % 16 && v != '\n' && v != 0xC3 && v != 0xFF) continue;
        char piece[8];
        snprintf(piece, sizeof piece, "<0x%02X>", v);
        fuzz_add_piece(&b, piece, strlen(piece), 0.0f);
    }
    for (int c = 0x20; c < 0x7f; c++) fuzz_add_piece(&b, (char[]){(char)c}, 1, -1.0f);
    for (size_t i = 0; i < sizeof MERGES / sizeof MERGES[0]; i++)
        fuzz_add_piece(&b, MERGES[i], strlen(MERGES[i]), -2.0f - (float)i);
    ac_tokenizer *t = fuzz_tokenizer_finish(&b);
    fuzz_assert(t != NULL, "the built-in tokenizer loads");
    return t;
}

/* ------------------------------------------------------------------ models */

static uint64_t g_rng = 0x243F6A8885A308D3ull;

static float uniform(float a) { /* in [-a, a), splitmix64 */
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return a * (2.0f * (float)(z >> 40) / 16777216.0f - 1.0f);
}

static void put_i32(fuzz_buf *b, int32_t v) { fuzz_put(b, &v, 4); }

static void put_random(fuzz_buf *b, uint64_t n, float a) {
    for (uint64_t i = 0; i < n; i++) {
        float v = uniform(a);
        fuzz_put(b, &v, 4);
    }
}

static void put_norm(fuzz_buf *b, uint64_t n) {
    for (uint64_t i = 0; i < n; i++) {
        float v = 1.0f + uniform(0.2f);
        fuzz_put(b, &v, 4);
    }
}

/* (V, D) embedding or classifier, the rows of BOS and EOS scaled up by boost. */
static void put_vocab_matrix(fuzz_buf *b, int V, int D, float a, float boost) {
    for (int r = 0; r < V; r++)
        put_random(b, (uint64_t)D, r == AC_TOKEN_BOS || r == AC_TOKEN_EOS ? a * boost : a);
}

typedef struct {
    int dim, hidden, layers, heads, kv_heads, vocab, seq_len, shared, version;
} model_spec;

static ac_model *build_model(const model_spec *s) {
    int D = s->dim, H = s->hidden, L = s->layers, V = s->vocab;
    uint64_t KV = (uint64_t)(D / s->heads) * (uint64_t)s->kv_heads, hs = (uint64_t)(D / s->heads);
    float wa = 0.5f / sqrtf((float)D), ha = 0.5f / sqrtf((float)H);
    fuzz_buf b = {0};
    if (s->version == 1) {
        put_i32(&b, 0x616b3432); /* "ak42" */
        put_i32(&b, 1);
    }
    int32_t params[7] = {D, H, L, s->heads, s->kv_heads, s->version == 0 && !s->shared ? -V : V, s->seq_len};
    fuzz_put(&b, params, sizeof params);
    if (s->version == 1) {
        unsigned char pad[256 - 36] = {(unsigned char)s->shared};
        fuzz_put(&b, pad, sizeof pad);
        put_norm(&b, (uint64_t)L * D); /* rms_att */
        put_norm(&b, (uint64_t)L * D); /* rms_ffn */
        put_norm(&b, (uint64_t)D);     /* rms_final */
        put_vocab_matrix(&b, V, D, 1.0f, s->shared ? 3.0f : 1.0f);
        put_random(&b, (uint64_t)L * D * D, wa);   /* wq */
        put_random(&b, (uint64_t)L * KV * D, wa);  /* wk */
        put_random(&b, (uint64_t)L * KV * D, wa);  /* wv */
        put_random(&b, (uint64_t)L * D * D, wa);   /* wo */
        put_random(&b, (uint64_t)L * H * D, wa);   /* w1 */
        put_random(&b, (uint64_t)L * D * H, ha);   /* w2 */
        put_random(&b, (uint64_t)L * H * D, wa);   /* w3 */
    } else {
        put_vocab_matrix(&b, V, D, 1.0f, s->shared ? 3.0f : 1.0f);
        put_norm(&b, (uint64_t)L * D);             /* rms_att */
        put_random(&b, (uint64_t)L * D * D, wa);   /* wq */
        put_random(&b, (uint64_t)L * KV * D, wa);  /* wk */
        put_random(&b, (uint64_t)L * KV * D, wa);  /* wv */
        put_random(&b, (uint64_t)L * D * D, wa);   /* wo */
        put_norm(&b, (uint64_t)L * D);             /* rms_ffn */
        put_random(&b, (uint64_t)L * H * D, wa);   /* w1 */
        put_random(&b, (uint64_t)L * D * H, ha);   /* w2 */
        put_random(&b, (uint64_t)L * H * D, wa);   /* w3 */
        put_norm(&b, (uint64_t)D);                 /* rms_final */
        put_random(&b, (uint64_t)s->seq_len * hs, 1.0f); /* the legacy RoPE tables (skipped) */
    }
    if (!s->shared) put_vocab_matrix(&b, V, D, 0.5f, 2.0f); /* wcls */
    ac_model *m = NULL;
    /* realloc'd memory is malloc-aligned; it lives as long as the process (the model borrows it) */
    fuzz_assert(ac_model_load_memory(b.data, b.size, "built-in", &m) == AC_OK, "the built-in model loads");
    return m;
}

enum { N_MODELS = 4 };
static ac_tokenizer *g_tok;
static ac_model *g_models[N_MODELS];
static int g_vocab;
static int g_seq_len[N_MODELS];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    g_tok = build_tokenizer();
    g_vocab = ac_tokenizer_vocab_size(g_tok);
    /* dim, hidden_dim, layers, heads, kv heads, vocab, seq_len, shared classifier, version */
    model_spec v1 = {16, 32, 2, 2, 1, g_vocab, 24, 0, 1};
    model_spec v0 = {32, 64, 1, 4, 2, g_vocab, 72, 1, 0};
    g_models[0] = build_model(&v1);
    fuzz_assert(ac_model_quantize(g_models[0], 16, &g_models[1]) == AC_OK, "quantize, group size 16");
    g_models[2] = build_model(&v0);
    fuzz_assert(ac_model_quantize(g_models[2], 32, &g_models[3]) == AC_OK, "quantize, group size 32");
    for (int i = 0; i < N_MODELS; i++) {
        ac_config c;
        fuzz_assert(ac_model_config(g_models[i], &c) == AC_OK && c.vocab_size == g_vocab, "model config");
        g_seq_len[i] = c.seq_len;
    }
    return 0;
}

/* ------------------------------------------------------------------ settings */

static const float TEMPERATURES[16] = {0.0f, 0.0f, 0.0f, -0.0f, 1e-30f, 0.01f, 0.5f, 0.8f,
                                       1.0f, 1.0f, 2.5f, 100.0f, INFINITY, NAN, -1.0f, -INFINITY};
static const float TOP_PS[16] = {1.0f, 1.0f, 1.0f, 0.9f, 0.5f, 0.1f, 1e-6f, 1.17549435e-38f,
                                 0.99999994f, 0.0f, -0.0f, -0.5f, 1.0000001f, NAN, INFINITY, 0.95f};

typedef struct {
    int n_seqs, threads, ignore_eos, model, by_hand, null_tokens;
    int max_new, stop_after, n_logit_bytes;
    ac_sampler_params params;
    int sampler_valid; /* the sampler settings are valid */
    int valid;         /* ... and max_new_tokens too */
} settings;

static settings parse_settings(const uint8_t h[HEADER_BYTES], int V) {
    settings s;
    s.params = ac_sampler_default_params(); /* the fields not set below stay neutral */
    s.n_seqs = 1 + (h[0] & 3);
    s.threads = 1 + ((h[0] >> 2) & 1);
    s.ignore_eos = (h[0] >> 3) & 1;
    s.model = (h[0] >> 4) & 3;
    s.by_hand = (h[0] >> 6) & 1;
    s.null_tokens = (h[0] >> 7) & 1;
    s.max_new = h[1] < 246 ? h[1] % (MAX_NEW + 1) : 245 - h[1];
    s.stop_after = (h[2] >> 4) >= 12 ? 3 * ((h[2] >> 4) - 12) + 1 : 0;
    s.params.temperature = TEMPERATURES[h[2] & 15];
    s.params.top_p = TOP_PS[h[3] & 15];
    int k = h[5] | (h[4] & 31) << 8;
    switch (h[4] >> 5) {
    case 0: case 1: case 2: s.params.top_k = 0; break;
    case 3: s.params.top_k = 1 + h[5] % 4; break;
    case 4: s.params.top_k = k % (V + 4); break;
    case 5: s.params.top_k = V - 2 + h[5] % 6; break;
    case 6: s.params.top_k = h[5] & 1 ? INT_MAX : 1000 + k; break;
    default: s.params.top_k = h[5] == 0 ? INT_MIN : -(int)h[5]; break;
    }
    uint32_t seed = (uint32_t)h[6] | (uint32_t)h[7] << 8 | (uint32_t)h[8] << 16 | (uint32_t)h[9] << 24;
    s.params.seed = h[9] == 0xFF ? UINT64_MAX - 1 - (h[6] & 3) : seed;
    s.n_logit_bytes = h[11] & 63;
    float t = s.params.temperature, p = s.params.top_p;
    s.sampler_valid = !isnan(t) && t >= 0.0f && !isnan(p) && p > 0.0f && p <= 1.0f && s.params.top_k >= 0;
    s.valid = s.sampler_valid && s.max_new >= 0;
    return s;
}

/* The session (or batch) settings of an input, with seed and thread count. */
static ac_session_params session_params(const settings *s, uint64_t seed, int threads) {
    ac_session_params p = ac_session_default_params();
    p.sampler = s->params;
    p.sampler.seed = seed;
    p.max_new_tokens = s->max_new;
    p.n_threads = threads;
    p.ignore_eos = s->ignore_eos;
    return p;
}

/* ------------------------------------------------------------------ generation checks */

typedef struct {
    int prev, count, cap, stop_after, ignore_eos;
    int *tokens;
} gen_ctx;

/* The bytes of a reported piece: exactly ac_decode_piece(prev, token), readable. */
static void check_piece(int prev, int token, const char *piece, size_t len) {
    fuzz_assert(token >= 0 && token < g_vocab, "token in the vocabulary");
    fuzz_assert(piece != NULL || len == 0, "piece pointer");
    const char *want;
    size_t want_len;
    fuzz_assert(ac_decode_piece(g_tok, prev, token, &want, &want_len) == AC_OK, "decode piece");
    fuzz_assert(len == want_len && (len == 0 || memcmp(piece, want, len) == 0),
                "the reported piece is ac_decode_piece(prev, token)");
}

static int on_piece(void *user, int token, const char *piece, size_t len) {
    gen_ctx *g = user;
    fuzz_assert(g->count < g->cap, "no more callbacks than max_new_tokens");
    fuzz_assert(g->ignore_eos || (token != AC_TOKEN_BOS && token != AC_TOKEN_EOS),
                "BOS/EOS are not reported without ignore_eos");
    check_piece(g->prev, token, piece, len);
    g->tokens[g->count++] = token;
    g->prev = token;
    return g->stop_after && g->count >= g->stop_after;
}

/* The expected count of a run that nothing stopped early: min(max_new, room). */
static int full_count(int max_new, int room) { return max_new < room ? max_new : room; }

/* ac_session_feed + ac_session_next by hand on prompt 0: the same tokens as ac_generate
 * (gen, n_gen of them, not cut short by the callback) and a consistent position. */
static void by_hand(const ac_model *m, int seq_len, const settings *s, int threads, const char *prompt,
                    size_t len, int n_prompt, int last_prompt_token, const int *gen, int n_gen,
                    int gen_complete, ac_stop_reason gen_stop) {
    ac_session *ses = NULL;
    ac_session_params params = session_params(s, s->params.seed, threads);
    expect_rc(ac_session_create(m, g_tok, &params, &ses), AC_OK, "ac_session_create (by hand)");
    int token = 0;
    expect_rc(ac_session_next(ses, &token, NULL, NULL), AC_OK, "ac_session_next before any feed");
    fuzz_assert(token == -1 && ac_session_position(ses) == 0 && ac_session_stop_reason(ses) == AC_STOP_NONE,
                "nothing fed: no token");
    int rc = ac_session_feed(ses, prompt, len, 1);
    if (n_prompt > seq_len) {
        expect_rc(rc, AC_ERR_RANGE, "ac_session_feed of a prompt longer than seq_len");
        fuzz_assert(ac_session_position(ses) == 0, "a refused feed runs nothing");
        ac_session_free(ses);
        return;
    }
    expect_rc(rc, AC_OK, "ac_session_feed");
    fuzz_assert(ac_session_position(ses) == n_prompt, "position after the prompt");
    int count = 0, prev = last_prompt_token;
    while (gen_complete || count < n_gen) {
        const char *piece = NULL;
        size_t plen = 0;
        expect_rc(ac_session_next(ses, &token, &piece, &plen), AC_OK, "ac_session_next");
        if (token < 0) break;
        fuzz_assert(ac_session_position(ses) == n_prompt + count, "position while sampling");
        check_piece(prev, token, piece, plen);
        prev = token;
        fuzz_assert(s->ignore_eos || (token != AC_TOKEN_BOS && token != AC_TOKEN_EOS),
                    "by hand: BOS/EOS are not reported without ignore_eos");
        fuzz_assert(count < n_gen, "by hand: no more tokens than ac_generate");
        fuzz_assert(token == gen[count], "by hand: the tokens of ac_generate");
        count++;
    }
    ac_stop_reason why = ac_session_stop_reason(ses);
    /* the last reported token is not run yet, unless the model ended the text after it */
    int pending = count > 0 && why != AC_STOP_END;
    if (gen_complete) {
        fuzz_assert(count == n_gen && why == gen_stop, "by hand: the tokens and the stop of ac_generate");
        fuzz_assert(why != AC_STOP_CONTEXT || count == seq_len - n_prompt, "context full only at seq_len");
        fuzz_assert(why != AC_STOP_LENGTH || count == s->max_new, "length only at max_new_tokens");
    }
    /* continue the text without BOS: it fits or is refused whole */
    int pos = ac_session_position(ses), n_more = 0;
    int *more = malloc((len + 3) * sizeof *more);
    fuzz_assert(more != NULL, "out of memory");
    fuzz_assert(ac_encode(g_tok, prompt, len, 0, 0, more, (int)len + 3, &n_more) == AC_OK, "encode");
    free(more);
    rc = ac_session_feed(ses, prompt, len, 0);
    if (pos + pending + n_more > seq_len) {
        expect_rc(rc, AC_ERR_RANGE, "ac_session_feed past seq_len");
        fuzz_assert(ac_session_position(ses) == pos, "a refused feed runs nothing");
    } else {
        expect_rc(rc, AC_OK, "ac_session_feed (continuation)");
        fuzz_assert(ac_session_position(ses) == pos + pending + n_more, "position after the continuation");
        expect_rc(ac_session_next(ses, &token, NULL, NULL), AC_OK, "ac_session_next after the continuation");
        ac_stop_reason after = ac_session_stop_reason(ses);
        int room = ac_session_position(ses) < seq_len;
        fuzz_assert(token < g_vocab && (token >= 0 ? room && s->max_new > 0 && after == AC_STOP_NONE
                                                   : after == AC_STOP_END || (after == AC_STOP_LENGTH && s->max_new == 0) ||
                                                         (after == AC_STOP_CONTEXT && !room)),
                    "a token exactly when there is room, else the reason why not");
    }
    ac_session_reset(ses);
    fuzz_assert(ac_session_position(ses) == 0, "reset forgets the context");
    expect_rc(ac_session_next(ses, &token, NULL, NULL), AC_OK, "ac_session_next after reset");
    fuzz_assert(token == -1, "after reset: no token until a feed");
    ac_session_free(ses);
}

/* A sampled token lies inside the top-k / top-p candidates: fewer than top_k tokens are
 * strictly more likely, and those hold at most top_p of the (top-k) mass.  Called for
 * temperatures in [0.5, 2.5] and logits in [-16, 16): no probability underflows and distinct
 * logits give distinct probabilities, so rounding cannot reorder the candidates. */
static void check_top_k_top_p(const ac_sampler_params *p, const float *logits, int V, int token) {
    double max = logits[0], above = 0.0;
    int n_above = 0;
    for (int i = 1; i < V; i++) if (logits[i] > max) max = logits[i];
    double *probs = malloc((size_t)V * sizeof *probs);
    fuzz_assert(probs != NULL, "out of memory");
    for (int i = 0; i < V; i++) probs[i] = exp((logits[i] - max) / p->temperature);
    for (int i = 0; i < V; i++)
        if (logits[i] > logits[token]) {
            n_above++;
            above += probs[i];
        }
    int k = p->top_k > 0 && p->top_k < V ? p->top_k : V;
    fuzz_assert(n_above < k, "the sampled token is among the top_k");
    if (p->top_p < 1.0f) {
        double zk = 0.0; /* the mass of the k most likely tokens */
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int i = 0; i < V; i++)
                if (probs[i] >= 0.0 && (best < 0 || probs[i] > probs[best])) best = i;
            zk += probs[best];
            probs[best] = -1.0;
        }
        fuzz_assert(above / zk <= (double)p->top_p + 1e-4, "the sampled token is inside the top_p nucleus");
    }
    free(probs);
}

/* ac_sample on logits made of the first n prompt bytes (NaN, infinities, huge and ordinary
 * values), the other logits -16. */
static void sample_odd_logits(const settings *s, const uint8_t *bytes, size_t n) {
    int V = g_vocab;
    float *logits = malloc((size_t)V * sizeof *logits), *copy = malloc((size_t)V * sizeof *copy);
    fuzz_assert(logits && copy, "out of memory");
    int ordinary = 1; /* every logit in [-16, 16) */
    for (int i = 0; i < V; i++) {
        uint8_t b = (size_t)i < n ? bytes[i] : 0; /* the rest: -16, the least likely */
        ordinary &= b < 0xFB;
        switch (b) {
        case 0xFF: logits[i] = NAN; break;
        case 0xFE: logits[i] = INFINITY; break;
        case 0xFD: logits[i] = -INFINITY; break;
        case 0xFC: logits[i] = 3e38f; break;
        case 0xFB: logits[i] = -3e38f; break;
        default: logits[i] = ((float)b - 128.0f) / 8.0f; break;
        }
    }
    memcpy(copy, logits, (size_t)V * sizeof *copy);
    ac_sampler *a = NULL, *b = NULL;
    expect_rc(ac_sampler_create(&s->params, V, &a), AC_OK, "ac_sampler_create");
    expect_rc(ac_sampler_create(&s->params, V, &b), AC_OK, "ac_sampler_create");
    for (int round = 0; round < 8; round++) {
        int ta = -1, tb = -1;
        expect_rc(ac_sample(a, logits, &ta), AC_OK, "ac_sample");
        expect_rc(ac_sample(b, logits, &tb), AC_OK, "ac_sample");
        fuzz_assert(ta >= 0 && ta < V, "sampled token in the vocabulary");
        fuzz_assert(ta == tb, "sampling is deterministic for a seed");
        fuzz_assert(memcmp(copy, logits, (size_t)V * sizeof *copy) == 0, "the logits are not modified");
        if (s->params.temperature == 0.0f) { /* NaNs never win; all NaN: token 0 */
            int all_nan = 1;
            for (int i = 0; i < V; i++) all_nan &= isnan(logits[i]);
            fuzz_assert(all_nan ? ta == 0 : !isnan(logits[ta]), "greedy never picks a NaN");
            for (int i = 0; !all_nan && i < V; i++)
                fuzz_assert(isnan(logits[i]) || (i < ta ? logits[i] < logits[ta] : logits[i] <= logits[ta]),
                            "greedy picks the first maximum");
        }
        if (ordinary && s->params.temperature >= 0.5f && s->params.temperature <= 2.5f)
            check_top_k_top_p(&s->params, logits, V, ta);
    }
    ac_sampler_free(a);
    ac_sampler_free(b);
    free(logits);
    free(copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > MAX_INPUT_BYTES) return 0;
    uint8_t h[HEADER_BYTES] = {0};
    memcpy(h, data, size < HEADER_BYTES ? size : HEADER_BYTES);
    const uint8_t *text = size > HEADER_BYTES ? data + HEADER_BYTES : (const uint8_t *)"";
    size_t text_len = size > HEADER_BYTES ? size - HEADER_BYTES : 0;
    settings s = parse_settings(h, g_vocab);
    const ac_model *m = g_models[s.model];
    int seq_len = g_seq_len[s.model], V = g_vocab;

    /* the prompts */
    enum { MAX_SEQS = 4 };
    const char *prompts[MAX_SEQS];
    size_t lens[MAX_SEQS];
    size_t at = 0;
    for (int i = 0; i < s.n_seqs; i++) {
        prompts[i] = (const char *)text + at;
        size_t end = at;
        if (i < s.n_seqs - 1)
            while (end < text_len && text[end] != h[10]) end++;
        else
            end = text_len;
        lens[i] = end - at;
        at = end < text_len ? end + 1 : end;
    }
    int n_prompt[MAX_SEQS], last_token[MAX_SEQS], any_too_long = 0;
    for (int i = 0; i < s.n_seqs; i++) {
        int *toks = malloc((lens[i] + 3) * sizeof *toks);
        fuzz_assert(toks != NULL, "out of memory");
        int rc = ac_encode(g_tok, prompts[i], lens[i], 1, 0, toks, (int)lens[i] + 3, &n_prompt[i]);
        fuzz_assert(rc == AC_OK && n_prompt[i] >= 1, "encode the prompt");
        last_token[i] = toks[n_prompt[i] - 1];
        free(toks);
        any_too_long |= n_prompt[i] > seq_len;
    }

    if (!s.valid) { /* bad settings are refused everywhere, with a message */
        ac_session *ses = (ac_session *)1;
        ac_batch *bat = (ac_batch *)1;
        ac_sampler *smp = (ac_sampler *)1;
        ac_session_params p = session_params(&s, s.params.seed, s.threads);
        expect_rc(ac_session_check_params(&p), AC_ERR_ARG, "ac_session_check_params, bad settings");
        expect_rc(ac_session_create(m, g_tok, &p, &ses), AC_ERR_ARG, "ac_session_create, bad settings");
        expect_rc(ac_batch_create(m, g_tok, s.n_seqs, &p, &bat), AC_ERR_ARG, "ac_batch_create, bad settings");
        fuzz_assert(ses == NULL && bat == NULL, "no object on failure");
        expect_rc(ac_sampler_create(&s.params, V, &smp), s.sampler_valid ? AC_OK : AC_ERR_ARG, "ac_sampler_create");
        fuzz_assert((smp != NULL) == s.sampler_valid, "a sampler exactly for valid sampler settings");
        ac_sampler_free(smp);
        return 0;
    }
    sample_odd_logits(&s, text, text_len < (size_t)s.n_logit_bytes ? text_len : (size_t)s.n_logit_bytes);

    /* ac_generate, sequence i with seed + i */
    int cap = s.max_new > 0 ? s.max_new : 1;
    int *gen = malloc((size_t)MAX_SEQS * cap * sizeof *gen);
    int n_gen[MAX_SEQS], gen_complete[MAX_SEQS], comparable[MAX_SEQS];
    ac_stop_reason gen_stop[MAX_SEQS];
    fuzz_assert(gen != NULL, "out of memory");
    for (int i = 0; i < s.n_seqs; i++) {
        uint64_t seed = s.params.seed + (uint64_t)i;
        comparable[i] = seed != AC_SEED_RANDOM;
        ac_session_params p = session_params(&s, seed, s.threads);
        ac_session *ses = NULL;
        expect_rc(ac_session_create(m, g_tok, &p, &ses), AC_OK, "ac_session_create");
        gen_ctx g = {last_token[i], 0, s.max_new > 0 ? s.max_new : 0, s.stop_after, s.ignore_eos,
                     gen + (size_t)i * cap};
        int n = -1;
        int rc = ac_generate(ses, prompts[i], lens[i], on_piece, &g, &n);
        int expected = n_prompt[i] > seq_len ? AC_ERR_RANGE : AC_OK;
        expect_rc(rc, expected, "ac_generate");
        fuzz_assert(n == g.count, "n_generated counts the callbacks");
        int room = seq_len - n_prompt[i];
        if (rc != AC_OK) fuzz_assert(n == 0, "nothing generated on failure");
        else {
            fuzz_assert(n <= s.max_new && n <= room, "count within max_new_tokens and seq_len");
            int full = full_count(s.max_new, room);
            if (s.stop_after && s.stop_after < full) full = s.stop_after;
            if (s.ignore_eos) fuzz_assert(n == full, "with ignore_eos: min(max_new_tokens, room) tokens");
            fuzz_assert(!s.stop_after || n <= s.stop_after, "the callback stops generation");
            ac_stop_reason why = ac_session_stop_reason(ses);
            fuzz_assert(why == AC_STOP_CALLER ? n == s.stop_after
                        : why == AC_STOP_LENGTH ? n == s.max_new
                        : why == AC_STOP_CONTEXT ? n == room
                        : why == AC_STOP_END && !s.ignore_eos && n < s.max_new && n < room,
                        "the stop reason fits the count");
        }
        n_gen[i] = n;
        gen_stop[i] = ac_session_stop_reason(ses);
        gen_complete[i] = gen_stop[i] != AC_STOP_CALLER;
        ac_session_free(ses);
    }

    if (s.by_hand)
        by_hand(m, seq_len, &s, 3 - s.threads, prompts[0], lens[0], n_prompt[0], last_token[0], gen,
                n_gen[0], gen_complete[0], gen_stop[0]);

    /* the batch: sequence i as ac_generate with seed + i */
    ac_batch *bat = NULL;
    ac_session_params bp = session_params(&s, s.params.seed, s.threads);
    expect_rc(ac_batch_create(m, g_tok, s.n_seqs, &bp, &bat), AC_OK, "ac_batch_create");
    int stride = ac_batch_max_tokens(bat);
    fuzz_assert(stride == full_count(s.max_new, seq_len - 1), "tokens per sequence: min(max_new_tokens, seq_len - 1)");
    ac_batch_result res[MAX_SEQS];
    if (s.null_tokens && s.max_new > 0)
        expect_rc(ac_batch_generate(bat, prompts, lens, NULL, res), AC_ERR_ARG,
                  "ac_batch_generate without a token buffer");
    int *out = s.max_new > 0 || !s.null_tokens ? malloc((size_t)s.n_seqs * cap * sizeof *out) : NULL;
    fuzz_assert(out != NULL || (s.null_tokens && s.max_new <= 0), "out of memory");
    int rc = ac_batch_generate(bat, prompts, lens, out, res);
    expect_rc(rc, any_too_long ? AC_ERR_RANGE : AC_OK, "ac_batch_generate");
    for (int i = 0; rc == AC_OK && i < s.n_seqs; i++) {
        int n = res[i].n_generated, room = seq_len - n_prompt[i];
        fuzz_assert(res[i].last_prompt_token == last_token[i], "batch: the prompt's last token");
        fuzz_assert(n >= 0 && n <= s.max_new && n <= room, "batch count within max_new_tokens and seq_len");
        if (s.ignore_eos) fuzz_assert(n == full_count(s.max_new, room), "batch with ignore_eos: full count");
        if (s.max_new == 0) continue;
        const int *t = out + (size_t)i * stride;
        int prev = last_token[i];
        for (int j = 0; j < n; j++) {
            fuzz_assert(t[j] >= 0 && t[j] < V, "batch token in the vocabulary");
            fuzz_assert(s.ignore_eos || (t[j] != AC_TOKEN_BOS && t[j] != AC_TOKEN_EOS), "batch: no BOS/EOS");
            const char *piece;
            size_t plen;
            expect_rc(ac_decode_piece(g_tok, prev, t[j], &piece, &plen), AC_OK, "decode a batch token");
            prev = t[j];
        }
        /* the same tokens as ac_generate with seed + i (a prefix when its callback stopped it) */
        if (!comparable[i]) continue;
        if (gen_complete[i]) fuzz_assert(n == n_gen[i] && res[i].stop == gen_stop[i], "batch count and stop == ac_generate's");
        else fuzz_assert(n >= n_gen[i], "batch count >= the stopped ac_generate count");
        for (int j = 0; j < n_gen[i]; j++)
            fuzz_assert(t[j] == gen[(size_t)i * cap + j], "batch tokens == ac_generate tokens");
    }
    ac_batch_free(bat);
    free(out);
    free(gen);
    return 0;
}
