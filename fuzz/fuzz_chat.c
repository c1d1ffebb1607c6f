/*
 * fuzz_chat.c - libFuzzer harness: conversations (ac_conversation_*) and the reply's text
 * (ac_chat_reply_*) on arbitrary messages and bytes.
 *
 * At start-up a tokenizer (printable ASCII, a few byte pieces; other bytes become <unk>) and
 * a tiny float32 model ("ak42" v1, dim 16, 2 layers, 2 heads, 1 kv head, seq_len 40, tied
 * classifier with the BOS/EOS rows scaled up so that replies end now and then) are built in
 * memory.
 *
 * Input: 4 settings bytes (missing bytes read as 0), then parts split at the separator byte:
 * the system prompt (empty: none), then the user turns.  Settings:
 *   byte 0   bits 0-1 template (qa, llama-2, chatml, or 3: the vocabulary's choice), bit 2
 *            the caller runs the "model": each turn's reply is the next part's bytes, handed
 *            to ac_conversation_reply in pieces of (byte 3 % 7) bytes (0: all at once)
 *   byte 1   max_new_tokens: byte % 12; 255 gives -1 (refused: AC_ERR_ARG)
 *   byte 2   separator
 *   byte 3   seed, and the piece size above
 *
 * Checked (abort on violation): a turn is answered (AC_OK), refused as too long
 * (AC_ERR_RANGE: nothing changes, the whole conversation's size is reported) or refused for
 * its settings (AC_ERR_ARG), with a message; a fitted prompt is 1..seq_len-1 tokens; the
 * cache keeps at most all but the prompt's last token; the reply has at most max_new_tokens
 * tokens, every one in the vocabulary, and the context never exceeds seq_len; the reply's
 * text is well-formed UTF-8 without leading ASCII whitespace and equals what one
 * ac_chat_reply_push of all its bytes gives (however they were cut); the conversation then
 * holds the messages before it, less those left out (oldest first, the system prompt kept),
 * plus the turn and that text.  Everything is freed (leak detection is on).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_buf.h"
#include "run.h"

#define HEADER_BYTES 4
#define MAX_INPUT_BYTES 2048

static void fuzz_assert(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "fuzz_chat: invariant failed: %s (last error: %s)\n", what, ac_last_error());
        abort();
    }
}

/* ------------------------------------------------------------------ tokenizer and model */

static ac_tokenizer *build_tokenizer(void) {
    fuzz_buf b = {0};
    fuzz_tokenizer_start(&b);
    for (int v = 0; v < 256; v += 16) {
        char piece[8];
        snprintf(piece, sizeof piece, "<0x%02X>", v);
        fuzz_add_piece(&b, piece, strlen(piece), 0.0f);
    }
    fuzz_add_piece(&b, "<0x0A>", 6, 0.0f);
    for (int c = 0x20; c < 0x7f; c++) fuzz_add_piece(&b, (char[]){(char)c}, 1, -1.0f);
    ac_tokenizer *t = fuzz_tokenizer_finish(&b);
    fuzz_assert(t != NULL, "the built-in tokenizer loads");
    return t;
}

static uint64_t g_rng = 0x13198A2E03707344ull;

static void put_floats(fuzz_buf *b, uint64_t n, float center, float a) { /* splitmix64 */
    for (uint64_t i = 0; i < n; i++) {
        uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float v = center + a * (2.0f * (float)(z >> 40) / 16777216.0f - 1.0f);
        fuzz_put(b, &v, 4);
    }
}

enum { DIM = 16, HIDDEN = 32, LAYERS = 2, HEADS = 2, KV_HEADS = 1, SEQ_LEN = 40 };

static ac_model *build_model(int vocab) {
    const uint64_t D = DIM, H = HIDDEN, L = LAYERS, KV = DIM / HEADS * KV_HEADS;
    fuzz_buf b = {0};
    int32_t head[9] = {0x616b3432, 1, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, vocab, SEQ_LEN};
    fuzz_put(&b, head, sizeof head);
    unsigned char rest[256 - sizeof head] = {1}; /* shared classifier */
    fuzz_put(&b, rest, sizeof rest);
    put_floats(&b, 2 * L * D + D, 1.0f, 0.2f); /* rms_att, rms_ffn, rms_final */
    for (int r = 0; r < vocab; r++)              /* token embedding = classifier */
        put_floats(&b, D, 0.0f, r == AC_TOKEN_BOS || r == AC_TOKEN_EOS ? 2.5f : 1.0f);
    float a = 0.5f / sqrtf((float)D);
    put_floats(&b, L * (D * D + 2 * KV * D + D * D + 3 * H * D), 0.0f, a); /* wq wk wv wo w1 w2 w3 */
    ac_model *m = NULL;
    /* the model borrows the buffer, which lives as long as the process */
    fuzz_assert(ac_model_load_memory(b.data, b.size, "built-in", &m) == AC_OK, "the built-in model loads");
    return m;
}

static ac_tokenizer *g_tok;
static ac_model *g_model;
static int g_vocab;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    g_tok = build_tokenizer();
    g_vocab = ac_tokenizer_vocab_size(g_tok);
    g_model = build_model(g_vocab);
    return 0;
}

/* ------------------------------------------------------------------ checks */

/* Well-formed UTF-8 (no overlongs, surrogates or code points above U+10FFFF). */
static int well_formed(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t len = c < 0x80 ? 1 : c < 0xC2 ? 0 : c <= 0xDF ? 2 : c <= 0xEF ? 3 : c <= 0xF4 ? 4 : 0;
        if (!len || i + len > n) return 0;
        unsigned lo = c == 0xE0 ? 0xA0 : c == 0xF0 ? 0x90 : 0x80, hi = c == 0xED ? 0x9F : c == 0xF4 ? 0x8F : 0xBF;
        for (size_t k = 1; k < len; k++)
            if (s[i + k] < (k == 1 ? lo : 0x80) || s[i + k] > (k == 1 ? hi : 0xBF)) return 0;
        i += len;
    }
    return 1;
}

typedef struct {
    char *data;
    size_t len;
} text;

static void append(text *t, const char *s, size_t n) {
    if (!n) return;
    t->data = realloc(t->data, t->len + n);
    fuzz_assert(t->data != NULL, "memory for the reply");
    memcpy(t->data + t->len, s, n);
    t->len += n;
}

/* The text one push of all of raw gives, compared with the reply's text. */
static void check_reply_text(const text *reply, const char *raw, size_t n) {
    fuzz_assert(well_formed((const unsigned char *)reply->data, reply->len), "the reply's text is well-formed UTF-8");
    fuzz_assert(!reply->len || !memchr("\t\n\v\f\r\x1c\x1d\x1e\x1f ", reply->data[0], 10),
                "no ASCII whitespace leads the reply");
    ac_chat_reply *r;
    const char *whole;
    size_t whole_len;
    fuzz_assert(ac_chat_reply_create(&r) == AC_OK, "ac_chat_reply_create");
    fuzz_assert(ac_chat_reply_push(r, raw, n, 1, &whole, &whole_len) == AC_OK, "ac_chat_reply_push");
    fuzz_assert(whole_len == reply->len && (!whole_len || !memcmp(whole, reply->data, whole_len)),
                "cut or whole, the same text");
    ac_chat_reply_free(r);
}

/* The conversation after a turn: the messages before it less the first `dropped` after the
 * system prompt, then the turn and its reply. */
static void check_joined(const ac_conversation *c, const ac_chat_message *before, int n_before, int has_system,
                         int dropped, const char *user, size_t user_len, const text *reply) {
    int n = ac_conversation_n_messages(c);
    fuzz_assert(dropped >= 0 && dropped <= n_before - has_system, "messages left out exist");
    fuzz_assert(n == n_before - dropped + 2, "the turn and its reply join");
    for (int i = 0; i < n - 2; i++) {
        const ac_chat_message *m = ac_conversation_message(c, i), *was = &before[i < has_system ? i : i + dropped];
        fuzz_assert(!strcmp(m->role, was->role) && m->content_len == was->content_len, "older messages stay");
    }
    const ac_chat_message *u = ac_conversation_message(c, n - 2), *a = ac_conversation_message(c, n - 1);
    fuzz_assert(!strcmp(u->role, "user") && u->content_len == user_len && !memcmp(u->content, user, user_len),
                "the turn joins as said");
    fuzz_assert(!strcmp(a->role, "assistant") && a->content_len == reply->len &&
                    !memcmp(a->content, reply->data ? reply->data : "", reply->len),
                "the reply joins as shown");
}

/* ------------------------------------------------------------------ one input */

typedef struct {
    const ac_chat_template *template;
    int by_caller, max_new_tokens, piece;
    unsigned char sep;
    uint64_t seed;
} settings;

/* The next part of data (up to the separator), advancing *at; 0 when none is left. */
static int next_part(const uint8_t *data, size_t size, size_t *at, unsigned char sep, const char **part,
                     size_t *len) {
    if (*at > size) return 0;
    const uint8_t *end = memchr(data + *at, sep, size - *at);
    size_t n = end ? (size_t)(end - (data + *at)) : size - *at;
    *part = (const char *)data + *at;
    *len = n;
    *at += n + 1;
    return 1;
}

/* The reply of a turn said with ac_conversation_say, generated by the conversation. */
static void reply_by_library(ac_conversation *c, const settings *s, const ac_conversation_turn *turn, text *reply) {
    fuzz_assert(turn->n_cached >= 0 && turn->n_cached < turn->n_prompt, "the cache keeps at most all but one");
    fuzz_assert(ac_conversation_position(c) == turn->n_prompt, "the prompt is in the cache");
    int n = 0;
    for (int token = 0; token >= 0;) {
        const char *piece;
        size_t len;
        fuzz_assert(ac_conversation_next(c, &token, &piece, &len) == AC_OK, "ac_conversation_next");
        fuzz_assert(token < g_vocab, "tokens are in the vocabulary");
        n += token >= 0;
        append(reply, piece, len);
        fuzz_assert(ac_conversation_position(c) <= SEQ_LEN, "the context stays within seq_len");
    }
    fuzz_assert(n <= s->max_new_tokens, "at most max_new_tokens tokens");
    fuzz_assert(ac_conversation_stop_reason(c) != AC_STOP_NONE, "the reply says why it ended");
}

/* The reply of a turn whose "generation" the caller ran: the next part's bytes, handed over
 * in pieces of s->piece bytes (0: all at once). */
static void reply_by_caller(ac_conversation *c, const settings *s, const char *raw, size_t len, text *reply) {
    size_t step = s->piece ? (size_t)s->piece : len, i = 0;
    do {
        size_t n = len - i < step ? len - i : step;
        const char *out;
        size_t out_len;
        fuzz_assert(ac_conversation_reply(c, raw + i, n, i + n == len, &out, &out_len) == AC_OK,
                    "ac_conversation_reply");
        append(reply, out, out_len);
        i += n;
    } while (i < len);
    check_reply_text(reply, raw, len);
}

static void one_input(const uint8_t *data, size_t size, const settings *s) {
    ac_conversation *c;
    fuzz_assert(ac_conversation_create(g_model, g_tok, s->template, &c) == AC_OK, "ac_conversation_create");
    ac_session_params p = ac_session_default_params();
    p.max_new_tokens = s->max_new_tokens;
    p.sampler.seed = s->seed;
    p.n_threads = 1;
    size_t at = 0, len;
    const char *part;
    int has_system = 0;
    if (next_part(data, size, &at, s->sep, &part, &len) && len > 0) {
        fuzz_assert(ac_conversation_add(c, "system", part, len) == AC_OK, "a system prompt is taken");
        has_system = 1;
    }
    ac_chat_message before[64];
    while (next_part(data, size, &at, s->sep, &part, &len)) {
        int n_before = ac_conversation_n_messages(c);
        if (n_before > 62) break;
        for (int i = 0; i < n_before; i++) before[i] = *ac_conversation_message(c, i);
        ac_conversation_turn turn;
        const int *tokens;
        int rc = s->by_caller ? ac_conversation_prompt(c, &p, part, len, &tokens, &turn)
                              : ac_conversation_say(c, &p, part, len, &turn);
        if (rc != AC_OK) {
            fuzz_assert(rc == (s->max_new_tokens < 0 ? AC_ERR_ARG : AC_ERR_RANGE), "refused for a reason");
            fuzz_assert(ac_last_error()[0] != '\0', "a refusal leaves a message");
            fuzz_assert(ac_conversation_n_messages(c) == n_before, "a refused turn changes nothing");
            fuzz_assert(rc == AC_ERR_ARG || (turn.n_prompt == 0 && turn.n_conversation > 0),
                        "a turn too long says how long");
            continue;
        }
        fuzz_assert(turn.n_prompt > 0 && turn.n_prompt < SEQ_LEN, "the prompt leaves room for the reply");
        fuzz_assert(turn.n_conversation >= turn.n_prompt, "leaving messages out makes the prompt shorter");
        text reply = {0};
        const char *user = part;
        size_t user_len = len;
        if (s->by_caller) {
            for (int i = 0; i < turn.n_prompt; i++) fuzz_assert(tokens[i] >= 0 && tokens[i] < g_vocab, "prompt ids");
            if (!next_part(data, size, &at, s->sep, &part, &len)) part = "", len = 0;
            reply_by_caller(c, s, part, len, &reply);
        } else {
            reply_by_library(c, s, &turn, &reply);
            fuzz_assert(well_formed((const unsigned char *)reply.data, reply.len), "the reply is well-formed UTF-8");
        }
        check_joined(c, before, n_before, has_system, turn.n_dropped, user, user_len, &reply);
        free(reply.data);
    }
    ac_conversation_free(c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > MAX_INPUT_BYTES) return 0;
    uint8_t h[HEADER_BYTES] = {0};
    memcpy(h, data, size < HEADER_BYTES ? size : HEADER_BYTES);
    settings s;
    s.template = (h[0] & 3) == 3 ? NULL : ac_chat_template_at(h[0] & 3);
    s.by_caller = (h[0] >> 2) & 1;
    s.max_new_tokens = h[1] == 255 ? -1 : h[1] % 12;
    s.sep = h[2];
    s.piece = h[3] % 7;
    s.seed = h[3];
    size_t skip = size < HEADER_BYTES ? size : HEADER_BYTES;
    one_input(data + skip, size - skip, &s);
    return 0;
}
