/*
 * fuzz_buf.h - the growing byte buffer the harnesses build their in-memory inputs in
 * (tokenizer files, model files), shared by fuzz_encode.c and fuzz_generate.c.
 */
#ifndef ARIANNA_FUZZ_BUF_H
#define ARIANNA_FUZZ_BUF_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "run.h"

typedef struct {
    unsigned char *data;
    size_t size, cap;
    int count;       /* tokenizer pieces added */
    int32_t max_len; /* the longest of them */
} fuzz_buf;

static void fuzz_put(fuzz_buf *b, const void *p, size_t n) {
    if (b->size + n > b->cap) {
        b->cap = (b->size + n) * 2;
        b->data = realloc(b->data, b->cap);
        if (!b->data) {
            fprintf(stderr, "fuzz: out of memory building an input\n");
            abort();
        }
    }
    memcpy(b->data + b->size, p, n);
    b->size += n;
}

/* A tokenizer file: fuzz_tokenizer_start, fuzz_add_piece for the other pieces, then
 * fuzz_tokenizer_finish. */
static void fuzz_add_piece(fuzz_buf *b, const char *piece, size_t len, float score) {
    int32_t n = (int32_t)len;
    fuzz_put(b, &score, 4);
    fuzz_put(b, &n, 4);
    fuzz_put(b, piece, len);
    b->count++;
    if (n > b->max_len) b->max_len = n;
}

/* The max_token_length field (patched by fuzz_tokenizer_finish) and the <unk>, <s>, </s>
 * pieces every built-in tokenizer starts with (ids 0, 1, 2). */
static void fuzz_tokenizer_start(fuzz_buf *b) {
    fuzz_put(b, &b->max_len, 4);
    fuzz_add_piece(b, "<unk>", 5, 0.0f);
    fuzz_add_piece(b, "<s>", 3, 0.0f);
    fuzz_add_piece(b, "</s>", 4, 0.0f);
}

/* Writes the longest piece's length into the header, loads the tokenizer from the buffer
 * (NULL on failure, with ac_last_error set) and frees the buffer. */
static ac_tokenizer *fuzz_tokenizer_finish(fuzz_buf *b) {
    memcpy(b->data, &b->max_len, 4);
    ac_tokenizer *t = NULL;
    if (ac_tokenizer_load_memory(b->data, b->size, b->count, "built-in", &t) != AC_OK) t = NULL;
    free(b->data);
    *b = (fuzz_buf){0};
    return t;
}

#endif /* ARIANNA_FUZZ_BUF_H */
