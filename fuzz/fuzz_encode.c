/*
 * fuzz_encode.c - libFuzzer harness: ac_encode() / ac_decode_piece() on arbitrary bytes.
 *
 * Two valid tokenizers are built in code at start-up: a "full" one holding all 256 byte
 * pieces plus ASCII, multi-byte UTF-8 and merged pieces, and a "partial" one lacking most
 * byte pieces (so unknown bytes become <unk>).  The first input byte picks the tokenizer and
 * the BOS/EOS flags; the rest is the text.  Checked: every id is in the vocabulary, the count
 * fits the documented capacity (len + 3), a too-small buffer reports the needed count, and
 * with the full tokenizer the stored pieces of the tokens spell exactly " " + text (encoding
 * is lossless thanks to the byte fallback; empty text gets no dummy prefix).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_buf.h"
#include "run.h"

static void fuzz_assert(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "fuzz_encode: invariant failed: %s (last error: %s)\n", what, ac_last_error());
        abort();
    }
}

/* ------------------------------------------------------------------ tokenizer construction */

/* Merged pieces, best (highest score) first; several share prefixes and scores on purpose. */
static const char *const MERGES[] = {
    " t", "th", "he", " the", "in", "er", "an", " a", "re", "on", "\xc3\xa9", " \xc3\xa9",
    "\xe6\x9d\xb1", "\xe6\x9d\xb1\xe4\xba\xac", "\xf0\x9f\x99\x82", "ing", " th", " in", "  ",
    "   ", "\n\n", "<0x41>x", "ab", "abc", "bc", "a", "ll", "\t", "e ", " e",
};

static ac_tokenizer *build_tokenizer(int with_bytes) {
    fuzz_buf f = {0};
    fuzz_tokenizer_start(&f);
    for (int b = 0; b < 256; b++) {
        if (!with_bytes && b % 7) continue; /* the partial tokenizer keeps 1 byte in 7 */
        char piece[8];
        snprintf(piece, sizeof piece, "<0x%02X>", b);
        fuzz_add_piece(&f, piece, 6, 0.0f);
    }
    for (int c = 0x20; c < 0x7f; c++) {
        char ch = (char)c;
        fuzz_add_piece(&f, &ch, 1, -1.0f);
    }
    float score = -2.0f;
    for (size_t i = 0; i < sizeof MERGES / sizeof MERGES[0]; i++, score -= (i % 3 == 0))
        fuzz_add_piece(&f, MERGES[i], strlen(MERGES[i]), score);
    ac_tokenizer *t = fuzz_tokenizer_finish(&f);
    fuzz_assert(t != NULL, "the built-in tokenizer loads");
    return t;
}

static ac_tokenizer *g_full, *g_partial;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    g_full = build_tokenizer(1);
    g_partial = build_tokenizer(0);
    return 0;
}

/* ------------------------------------------------------------------ checks */

/* The raw bytes a token stands for: the byte of a "<0xNN>" piece, else the stored piece. */
static size_t raw_bytes(const ac_tokenizer *t, int id, char *out) {
    const char *p;
    size_t len;
    fuzz_assert(ac_tokenizer_piece(t, id, &p, &len, NULL) == AC_OK, "piece lookup");
    unsigned v;
    char close;
    if (len == 6 && sscanf(p, "<0x%2X%c", &v, &close) == 2 && close == '>' && p[1] == '0') {
        out[0] = (char)v;
        return 1;
    }
    memcpy(out, p, len);
    return len;
}

/* With every byte piece present, the tokens spell the dummy-prefixed text exactly. */
static void check_lossless(const ac_tokenizer *t, const int *tokens, int count, int bos, int eos,
                           const char *text, size_t len) {
    char *spelled = malloc(8 * (size_t)count + 8);
    fuzz_assert(spelled != NULL, "out of memory");
    size_t n = 0;
    for (int i = bos; i < count - eos; i++) n += raw_bytes(t, tokens[i], spelled + n);
    if (len == 0) fuzz_assert(n == 0, "empty text spells nothing (no dummy prefix)");
    else fuzz_assert(n == len + 1 && spelled[0] == ' ' && memcmp(spelled + 1, text, len) == 0,
                     "tokens spell the text");
    free(spelled);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0 || size > 4096) return 0;
    int full = data[0] & 1, bos = (data[0] >> 1) & 1, eos = (data[0] >> 2) & 1;
    const ac_tokenizer *t = full ? g_full : g_partial;
    const char *text = (const char *)data + 1;
    size_t len = size - 1;
    int vocab = ac_tokenizer_vocab_size(t);
    int cap = (int)len + 3, count = -1;
    int *tokens = malloc((size_t)cap * sizeof *tokens);
    fuzz_assert(tokens != NULL, "out of memory");
    fuzz_assert(ac_encode(t, text, len, bos, eos, tokens, cap, &count) == AC_OK, "encode");
    fuzz_assert(count >= bos + eos && count <= cap, "count within len + 3");
    fuzz_assert(len == 0 || count > bos + eos, "non-empty text gives tokens");
    fuzz_assert(!bos || tokens[0] == AC_TOKEN_BOS, "BOS first");
    fuzz_assert(!eos || tokens[count - 1] == AC_TOKEN_EOS, "EOS last");
    int prev = -1;
    for (int i = 0; i < count; i++) {
        fuzz_assert(tokens[i] >= 0 && tokens[i] < vocab, "token in vocabulary");
        const char *piece;
        size_t plen;
        fuzz_assert(ac_decode_piece(t, prev, tokens[i], &piece, &plen) == AC_OK, "decode");
        prev = tokens[i];
    }
    if (full) check_lossless(t, tokens, count, bos, eos, text, len);
    /* too small a buffer: nothing written, the needed count reported */
    if (count > 0) {
        int needed = -1;
        fuzz_assert(ac_encode(t, text, len, bos, eos, tokens, count - 1, &needed) == AC_ERR_RANGE &&
                        needed == count, "a short buffer reports the needed count");
    }
    free(tokens);
    return 0;
}
