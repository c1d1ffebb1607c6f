/*
 * fuzz_tokenizer_load.c - libFuzzer harness: ac_tokenizer_load_memory() on arbitrary bytes.
 *
 * The harness walks the bytes itself (an independent, deliberately naive reading of the
 * llama2.c tokenizer layout) and checks the loader agrees: a well-formed file with n >= 3
 * pieces loads with vocab_size n and fails with AC_ERR_MISMATCH for n + 1; a malformed one fails
 * with AC_ERR_FORMAT and a message naming the buffer.  Loaded tokenizers then return every
 * piece exactly as stored, and encode / decode a slice of the input.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "run.h"

#define MAX_PIECES 4096 /* larger vocabularies are only checked by the loader itself */

static void fuzz_assert(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "fuzz_tokenizer_load: invariant failed: %s (last error: %s)\n", what,
                ac_last_error());
        abort();
    }
}

static int32_t get_i32(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Number of pieces of a well-formed file, or -1 when it is malformed. */
static long oracle_count(const uint8_t *d, size_t size) {
    if (size < 4) return -1;
    int32_t max_len = get_i32(d);
    if (max_len < 0 || max_len > AC_MAX_PIECE_BYTES) return -1;
    long n = 0;
    for (size_t pos = 4; pos < size; n++) {
        if (size - pos < 8) return -1;
        float score;
        memcpy(&score, d + pos, 4);
        int32_t len = get_i32(d + pos + 4);
        if (isnan(score) || len < 0 || len > max_len || (size_t)len > size - pos - 8) return -1;
        pos += 8 + (size_t)len;
    }
    return n;
}

/* Every piece comes back byte for byte, and decodes without error. */
static void check_pieces(const ac_tokenizer *t, const uint8_t *d, int n) {
    size_t pos = 4;
    for (int i = 0; i < n; i++) {
        int32_t len = get_i32(d + pos + 4);
        const char *piece;
        size_t got;
        float score;
        fuzz_assert(ac_tokenizer_piece(t, i, &piece, &got, &score) == AC_OK, "piece lookup");
        fuzz_assert(got == (size_t)len && memcmp(piece, d + pos + 8, got) == 0, "piece bytes");
        fuzz_assert(ac_decode_piece(t, i ? i - 1 : AC_TOKEN_BOS, i, &piece, &got) == AC_OK,
                    "decode piece");
        pos += 8 + (size_t)len;
    }
    fuzz_assert(ac_tokenizer_piece(t, n, NULL, NULL, NULL) == AC_ERR_RANGE, "piece past the end");
}

/* Encodes the last bytes of the input with the tokenizer built from it. */
static void check_encode(const ac_tokenizer *t, const uint8_t *d, size_t size, int n) {
    size_t len = size < 64 ? size : 64;
    const char *text = (const char *)d + size - len;
    int tokens[64 + 3], count = -1;
    fuzz_assert(ac_encode(t, text, len, 1, 1, tokens, (int)(len + 3), &count) == AC_OK, "encode");
    fuzz_assert(count >= 2 && count <= (int)len + 3, "token count");
    for (int i = 0; i < count; i++) {
        fuzz_assert(tokens[i] >= 0 && tokens[i] < n, "token in vocabulary");
        const char *piece;
        size_t plen;
        fuzz_assert(ac_decode_piece(t, i ? tokens[i - 1] : -1, tokens[i], &piece, &plen) == AC_OK,
                    "decode token");
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    long n = oracle_count(data, size);
    /* a file with fewer than AC_MIN_VOCAB pieces lacks the special tokens: never loads */
    int vocab = (n >= AC_MIN_VOCAB && n <= MAX_PIECES) ? (int)n : AC_MIN_VOCAB + (int)(size % 300);
    ac_tokenizer *t = NULL;
    int rc = ac_tokenizer_load_memory(data, size, vocab, "fuzz.tok", &t);
    if (rc != AC_OK) {
        fuzz_assert(t == NULL, "no tokenizer on failure");
        fuzz_assert(strncmp(ac_last_error(), "fuzz.tok: ", 10) == 0, "message names the buffer");
        if (n < 0) fuzz_assert(rc == AC_ERR_FORMAT, "a malformed file is a format error");
        else fuzz_assert(rc == AC_ERR_MISMATCH, "a well-formed file only mismatches the vocab");
        return 0;
    }
    fuzz_assert(n == vocab, "only well-formed files with vocab_size pieces load");
    fuzz_assert(ac_tokenizer_vocab_size(t) == vocab, "vocab_size");
    check_pieces(t, data, vocab);
    check_encode(t, data, size, vocab);
    ac_tokenizer_free(t);
    fuzz_assert(ac_tokenizer_load_memory(data, size, AC_MIN_VOCAB - 1, "fuzz.tok", &t) == AC_ERR_ARG,
                "a vocabulary without the special tokens is refused");
    /* the same well-formed file with one piece fewer than the model expects */
    if (vocab < AC_MAX_VOCAB) {
        fuzz_assert(ac_tokenizer_load_memory(data, size, vocab + 1, "fuzz.tok", &t) == AC_ERR_MISMATCH,
                    "piece count mismatch is reported");
    }
    return 0;
}
