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

/* A tokenizer file: start with fuzz_put(b, &b->max_len, 4), add the pieces, then copy
 * b->max_len into the first 4 bytes. */
static void fuzz_add_piece(fuzz_buf *b, const char *piece, size_t len, float score) {
    int32_t n = (int32_t)len;
    fuzz_put(b, &score, 4);
    fuzz_put(b, &n, 4);
    fuzz_put(b, piece, len);
    b->count++;
    if (n > b->max_len) b->max_len = n;
}

#endif /* ARIANNA_FUZZ_BUF_H */
