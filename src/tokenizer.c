/*
 * tokenizer.c - the llama2.c tokenizer file into an immutable ac_tokenizer, and text to
 * tokens and back.
 *
 * Encoding is SentencePiece's BPE exactly (byte fallback, identity normalization, a dummy
 * prefix space): symbols are UTF-8 characters, merged by the highest piece score with ties
 * to the leftmost pair, so the ids match what sentencepiece gives for the same model.
 * Decoding hands out each piece's bytes, with byte pieces as raw bytes and markers as
 * nothing.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <unistd.h>

struct ac_tokenizer {
    int vocab_size;
    int max_token_length;
    unsigned char *blob;        /* private copy of the file; pieces point into it */
    const char **pieces;        /* (V) piece bytes, not NUL-terminated */
    int *lens;                  /* (V) */
    float *scores;              /* (V) */
    short *byte_value;          /* (V) the byte of a "<0xNN>" piece, else -1 */
    int *sorted;                /* normal piece ids sorted by bytes, then id */
    int n_sorted;
    int byte_id[256];           /* id of the "<0xNN>" piece of each byte, -1 if absent */
    unsigned char bytes[256];   /* bytes[i] == i: stable storage for decoded byte pieces */
};

AC_API void ac_tokenizer_free(ac_tokenizer *t) {
    if (!t) return;
    free(t->blob);
    free(t->pieces);
    free(t->lens);
    free(t->scores);
    free(t->byte_value);
    free(t->sorted);
    free(t);
}

static int hex_digit(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    return -1;
}

/* The byte a "<0xNN>" byte-fallback piece stands for, or -1 for any other piece. */
static int parse_byte_piece(const char *p, int len) {
    if (len != 6 || p[0] != '<' || p[1] != '0' || p[2] != 'x' || p[5] != '>') return -1;
    int hi = hex_digit(p[3]), lo = hex_digit(p[4]);
    return (hi < 0 || lo < 0) ? -1 : hi * 16 + lo;
}

/* Lexicographic byte order, shorter first on a common prefix. */
static int compare_bytes(const char *a, int alen, const char *b, int blen) {
    int n = alen < blen ? alen : blen;
    int r = memcmp(a, b, (size_t)n);
    if (r) return r;
    return (alen > blen) - (alen < blen);
}

/* qsort has no context argument; the tokenizer being sorted is passed through this
 * thread-local (loading is single-threaded per call, and each thread has its own). */
static _Thread_local const ac_tokenizer *g_sorting;

static int compare_ids(const void *pa, const void *pb) {
    int a = *(const int *)pa, b = *(const int *)pb;
    const ac_tokenizer *t = g_sorting;
    int r = compare_bytes(t->pieces[a], t->lens[a], t->pieces[b], t->lens[b]);
    return r ? r : (a > b) - (a < b);
}

/* Walks the file and counts its pieces, checking each header and length.  Stops with an
 * error at the first piece that does not fit. */
static int scan_tokenizer(const unsigned char *data, size_t size, const char *name, int *max_len,
                          long long *n_pieces) {
    if (size < 4)
        return ac_fail(AC_ERR_FORMAT, "%s: %zu bytes is too short for a tokenizer header (4 bytes)",
                       name, size);
    *max_len = read_i32(data);
    if (*max_len < 0 || *max_len > AC_MAX_PIECE_BYTES)
        return ac_fail(AC_ERR_FORMAT, "%s: max_token_length is %d, expected 0..%d", name, *max_len,
                       AC_MAX_PIECE_BYTES);
    size_t pos = 4;
    long long n = 0;
    while (pos < size) {
        if (size - pos < 8)
            return ac_fail(AC_ERR_FORMAT, "%s: piece %lld header runs past the end of the file "
                           "(%zu bytes left, 8 needed)", name, n, size - pos);
        float score = read_f32(data + pos);
        int32_t len = read_i32(data + pos + 4);
        if (isnan(score)) return ac_fail(AC_ERR_FORMAT, "%s: piece %lld has a NaN score", name, n);
        if (len < 0 || len > *max_len)
            return ac_fail(AC_ERR_FORMAT, "%s: piece %lld has length %d, expected 0..%d "
                           "(max_token_length)", name, n, len, *max_len);
        pos += 8;
        if ((size_t)len > size - pos)
            return ac_fail(AC_ERR_FORMAT, "%s: piece %lld (length %d) runs past the end of the file",
                           name, n, len);
        pos += (size_t)len;
        n++;
    }
    *n_pieces = n;
    return AC_OK;
}

/* Fills the piece tables from the (already validated) blob and builds the lookup index. */
static int index_tokenizer(ac_tokenizer *t, const char *name) {
    int V = t->vocab_size;
    t->pieces = calloc((size_t)V, sizeof *t->pieces);
    t->lens = calloc((size_t)V, sizeof *t->lens);
    t->scores = calloc((size_t)V, sizeof *t->scores);
    t->byte_value = calloc((size_t)V, sizeof *t->byte_value);
    t->sorted = calloc((size_t)V, sizeof *t->sorted);
    if (!t->pieces || !t->lens || !t->scores || !t->byte_value || !t->sorted)
        return ac_fail(AC_ERR_NOMEM, "%s: out of memory for %d tokenizer pieces", name, V);
    for (int b = 0; b < 256; b++) {
        t->byte_id[b] = -1;
        t->bytes[b] = (unsigned char)b;
    }
    size_t pos = 4;
    for (int i = 0; i < V; i++) {
        t->scores[i] = read_f32(t->blob + pos);
        t->lens[i] = read_i32(t->blob + pos + 4);
        t->pieces[i] = (const char *)t->blob + pos + 8;
        pos += 8 + (size_t)t->lens[i];
        int b = parse_byte_piece(t->pieces[i], t->lens[i]);
        t->byte_value[i] = (short)b;
        /* a byte's token is the first piece for it, never a special (0..2 are markers) */
        if (b >= 0 && i > AC_TOKEN_EOS && t->byte_id[b] < 0) t->byte_id[b] = i;
        /* "normal" pieces are the ones merges may produce: not the specials, not bytes */
        if (i > AC_TOKEN_EOS && b < 0) t->sorted[t->n_sorted++] = i;
    }
    g_sorting = t;
    qsort(t->sorted, (size_t)t->n_sorted, sizeof *t->sorted, compare_ids);
    g_sorting = NULL;
    return AC_OK;
}

static int tokenizer_from_bytes(const void *data, size_t size, int vocab_size, const char *name,
                                ac_tokenizer **out) {
    int max_len = 0;
    long long n_pieces = 0;
    int rc = scan_tokenizer(data, size, name, &max_len, &n_pieces);
    if (rc) return rc;
    if (n_pieces != vocab_size)
        return ac_fail(AC_ERR_MISMATCH, "%s: tokenizer has %lld pieces but the model's vocab_size is %d",
                       name, n_pieces, vocab_size);
    ac_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return ac_fail(AC_ERR_NOMEM, "%s: out of memory for the tokenizer", name);
    t->vocab_size = vocab_size;
    t->max_token_length = max_len;
    t->blob = malloc(size);
    if (!t->blob) {
        ac_tokenizer_free(t);
        return ac_fail(AC_ERR_NOMEM, "%s: out of memory for %zu tokenizer bytes", name, size);
    }
    memcpy(t->blob, data, size);
    if ((rc = index_tokenizer(t, name))) {
        ac_tokenizer_free(t);
        return rc;
    }
    *out = t;
    return AC_OK;
}

AC_API int ac_tokenizer_load_memory(const void *data, size_t size, int vocab_size, const char *name,
                                    ac_tokenizer **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_tokenizer_load_memory: out is NULL");
    *out = NULL;
    if (!name) name = "<memory>";
    if (!data && size) return ac_fail(AC_ERR_ARG, "%s: data is NULL but size is %zu", name, size);
    if (vocab_size < AC_MIN_VOCAB || vocab_size > AC_MAX_VOCAB)
        return ac_fail(AC_ERR_ARG, "%s: vocab_size %d is outside %d..%d", name, vocab_size,
                       AC_MIN_VOCAB, AC_MAX_VOCAB);
    return tokenizer_from_bytes(data ? data : "", size, vocab_size, name, out);
}

/* Tokenizer files up to this size are always read in, so that scan_tokenizer can name the
 * piece at fault; larger ones must also pass check_tokenizer_size first. */
#define TOKENIZER_ALWAYS_READ (16u << 20)

/* A tokenizer of vocab_size pieces of at most max_token_length bytes each (the file's first
 * field) has at most 4 + vocab_size * (8 + max_token_length) bytes: a large file over that
 * is refused before it is read into memory.  Everything else is left to scan_tokenizer. */
static int check_tokenizer_size(int fd, size_t size, int vocab_size, const char *path) {
    unsigned char header[4];
    if (size <= TOKENIZER_ALWAYS_READ || vocab_size < AC_MIN_VOCAB || vocab_size > AC_MAX_VOCAB ||
        pread(fd, header, sizeof header, 0) != (ssize_t)sizeof header)
        return AC_OK;
    int max_len = read_i32(header);
    if (max_len < 0 || max_len > AC_MAX_PIECE_BYTES) return AC_OK;
    uint64_t most = 4 + (uint64_t)vocab_size * (8 + (uint64_t)max_len);
    if (size <= most) return AC_OK;
    return ac_fail(AC_ERR_FORMAT, "%s: file is %zu bytes, more than a tokenizer of %d pieces of at most "
                   "%d bytes (max_token_length) can be (%llu bytes)", path, size, vocab_size, max_len,
                   (unsigned long long)most);
}

AC_API int ac_tokenizer_load(const char *path, int vocab_size, ac_tokenizer **out) {
    if (!out) return ac_fail(AC_ERR_ARG, "ac_tokenizer_load: out is NULL");
    *out = NULL;
    if (!path) return ac_fail(AC_ERR_ARG, "ac_tokenizer_load: path is NULL");
    int fd;
    size_t size;
    int rc = ac_open_regular_file(path, "tokenizer", &fd, &size);
    if (rc) return rc;
    if ((rc = check_tokenizer_size(fd, size, vocab_size, path))) {
        close(fd);
        return rc;
    }
    unsigned char *buf = malloc(size ? size : 1);
    if (!buf) {
        close(fd);
        return ac_fail(AC_ERR_NOMEM, "%s: out of memory for %zu tokenizer bytes", path, size);
    }
    rc = ac_read_fully(fd, buf, size, path, "tokenizer");
    close(fd);
    if (!rc) rc = ac_tokenizer_load_memory(buf, size, vocab_size, path, out);
    free(buf);
    return rc;
}

AC_API int ac_tokenizer_vocab_size(const ac_tokenizer *t) { return t ? t->vocab_size : 0; }

AC_API int ac_tokenizer_piece(const ac_tokenizer *t, int id, const char **piece, size_t *len,
                              float *score) {
    if (!t) return ac_fail(AC_ERR_ARG, "ac_tokenizer_piece: tokenizer is NULL");
    if (id < 0 || id >= t->vocab_size)
        return ac_fail(AC_ERR_RANGE, "token %d is outside the vocabulary [0, %d)", id, t->vocab_size);
    if (piece) *piece = t->pieces[id];
    if (len) *len = (size_t)t->lens[id];
    if (score) *score = t->scores[id];
    return AC_OK;
}

/* The id of the normal piece with exactly these bytes, or -1. */
static int lookup_piece(const ac_tokenizer *t, const char *s, int len) {
    int lo = 0, hi = t->n_sorted; /* lower bound: the lowest id among equal pieces */
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2, id = t->sorted[mid];
        if (compare_bytes(t->pieces[id], t->lens[id], s, len) < 0) lo = mid + 1;
        else hi = mid;
    }
    if (lo < t->n_sorted) {
        int id = t->sorted[lo];
        if (compare_bytes(t->pieces[id], t->lens[id], s, len) == 0) return id;
    }
    return -1;
}

/* Length of the well-formed UTF-8 character at s[0..n), or 0 if the byte at s starts no
 * well-formed character (it then becomes a symbol of its own). */
static int utf8_char_len(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    int len;
    unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0) lo = 0xA0;      /* no overlong forms */
        else if (c == 0xED) hi = 0x9F; /* no surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0) lo = 0x90;
        else if (c == 0xF4) hi = 0x8F; /* nothing above U+10FFFF */
    } else
        return 0;
    if ((size_t)len > n) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (int i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return len;
}

/* BPE merge state: a doubly linked list of symbols over the normalized text, and a binary
 * max-heap of candidate merges, as SentencePiece's bpe_model does it. */
typedef struct {
    int start, len; /* bytes of the normalized text; len 0 = merged away */
    int id;         /* normal piece id, or -1 (falls back to byte tokens) */
    int prev, next;
} bpe_symbol;

typedef struct {
    float score;
    int left, right; /* symbol indices */
    int len;         /* bytes of the merged piece, to detect stale entries */
    int id;
} bpe_pair;

/* Higher score first; on equal scores the leftmost pair (SentencePiece's tie rule). */
static int pair_before(const bpe_pair *a, const bpe_pair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(bpe_pair *heap, int *n, bpe_pair p) {
    int i = (*n)++;
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (!pair_before(&p, &heap[parent])) break;
        heap[i] = heap[parent];
        i = parent;
    }
    heap[i] = p;
}

static bpe_pair heap_pop(bpe_pair *heap, int *n) {
    bpe_pair top = heap[0], last = heap[--(*n)];
    int i = 0;
    for (;;) {
        int child = 2 * i + 1;
        if (child >= *n) break;
        if (child + 1 < *n && pair_before(&heap[child + 1], &heap[child])) child++;
        if (!pair_before(&heap[child], &last)) break;
        heap[i] = heap[child];
        i = child;
    }
    if (*n > 0) heap[i] = last;
    return top;
}

/* Queues the merge of symbols left and right if their concatenation is a normal piece. */
static void try_pair(const ac_tokenizer *t, const char *text, const bpe_symbol *sym, int left,
                     int right, bpe_pair *heap, int *n_heap) {
    if (left < 0 || right < 0) return;
    int len = sym[left].len + sym[right].len;
    int id = lookup_piece(t, text + sym[left].start, len); /* symbols are contiguous */
    if (id < 0) return;
    bpe_pair p = {t->scores[id], left, right, len, id};
    heap_push(heap, n_heap, p);
}

/* Encodes into out (capacity >= len + 3) and returns the count; -1 on allocation failure. */
static int encode_into(const ac_tokenizer *t, const char *text, size_t len, int bos, int eos,
                       int *out) {
    int n = 0;
    if (bos) out[n++] = AC_TOKEN_BOS;
    if (len > 0) {
        /* normalization: identity, plus SentencePiece's dummy-prefix space */
        size_t n_text = len + 1;
        char *norm = malloc(n_text);
        bpe_symbol *sym = malloc(n_text * sizeof *sym);
        bpe_pair *heap = malloc(3 * n_text * sizeof *heap); /* n-1 initial + 2 per merge */
        if (!norm || !sym || !heap) {
            free(norm);
            free(sym);
            free(heap);
            return -1;
        }
        norm[0] = ' ';
        memcpy(norm + 1, text, len);

        int n_sym = 0;
        for (size_t i = 0; i < n_text;) {
            int clen = utf8_char_len((const unsigned char *)norm + i, n_text - i);
            if (clen == 0) clen = 1; /* a stray byte: its own symbol, byte fallback later */
            sym[n_sym] = (bpe_symbol){(int)i, clen, lookup_piece(t, norm + i, clen), n_sym - 1, n_sym + 1};
            n_sym++;
            i += (size_t)clen;
        }
        sym[n_sym - 1].next = -1;

        int n_heap = 0;
        for (int i = 0; i + 1 < n_sym; i++) try_pair(t, norm, sym, i, i + 1, heap, &n_heap);
        while (n_heap > 0) {
            bpe_pair p = heap_pop(heap, &n_heap);
            bpe_symbol *l = &sym[p.left], *r = &sym[p.right];
            /* skip entries made stale by an earlier merge of either side */
            if (l->len == 0 || r->len == 0 || l->next != p.right || l->len + r->len != p.len) continue;
            l->len = p.len;
            l->id = p.id;
            l->next = r->next;
            if (r->next >= 0) sym[r->next].prev = p.left;
            r->len = 0;
            try_pair(t, norm, sym, l->prev, p.left, heap, &n_heap);
            try_pair(t, norm, sym, p.left, l->next, heap, &n_heap);
        }

        for (int i = 0; i >= 0; i = sym[i].next) {
            if (sym[i].id >= 0) {
                out[n++] = sym[i].id;
                continue;
            }
            /* byte fallback: one token per byte of a character the vocabulary lacks */
            for (int b = 0; b < sym[i].len; b++) {
                int id = t->byte_id[(unsigned char)norm[sym[i].start + b]];
                out[n++] = id >= 0 ? id : AC_TOKEN_UNK;
            }
        }
        free(norm);
        free(sym);
        free(heap);
    }
    if (eos) out[n++] = AC_TOKEN_EOS;
    return n;
}

AC_API int ac_encode(const ac_tokenizer *t, const char *text, size_t len, int bos, int eos,
                     int *tokens, int max_tokens, int *n_tokens) {
    if (!t || !n_tokens || (!text && len > 0) || (!tokens && max_tokens > 0) || max_tokens < 0)
        return ac_fail(AC_ERR_ARG, "ac_encode: bad arguments");
    if (len > (size_t)INT_MAX / 4)
        return ac_fail(AC_ERR_RANGE, "ac_encode: text of %zu bytes is too long", len);
    size_t cap = len + 3;
    int *buf = tokens;
    if ((size_t)max_tokens < cap) { /* the exact count is unknown until encoded: use scratch */
        buf = malloc(cap * sizeof *buf);
        if (!buf) return ac_fail(AC_ERR_NOMEM, "ac_encode: out of memory");
    }
    int n = encode_into(t, text, len, bos != 0, eos != 0, buf);
    if (n < 0) {
        if (buf != tokens) free(buf);
        return ac_fail(AC_ERR_NOMEM, "ac_encode: out of memory for %zu bytes of text", len);
    }
    *n_tokens = n;
    if (buf != tokens) {
        int fits = n <= max_tokens;
        if (fits) memcpy(tokens, buf, (size_t)n * sizeof *buf);
        free(buf);
        if (!fits)
            return ac_fail(AC_ERR_RANGE, "ac_encode: %d tokens do not fit in max_tokens %d", n, max_tokens);
    }
    return AC_OK;
}

AC_API int ac_decode_piece(const ac_tokenizer *t, int prev, int token, const char **piece,
                           size_t *len) {
    if (!t || !piece || !len) return ac_fail(AC_ERR_ARG, "ac_decode_piece: NULL argument");
    if (token < 0 || token >= t->vocab_size)
        return ac_fail(AC_ERR_RANGE, "token %d is outside the vocabulary [0, %d)", token, t->vocab_size);
    const char *p = t->pieces[token];
    int n = t->lens[token];
    if (token <= AC_TOKEN_EOS) {
        n = 0; /* <unk>, <s>, </s> are markers, not text */
    } else if (t->byte_value[token] >= 0) {
        p = (const char *)&t->bytes[t->byte_value[token]];
        n = 1;
    } else if (prev == AC_TOKEN_BOS && n > 0 && p[0] == ' ') {
        p++; /* the dummy-prefix space SentencePiece added in front of the text */
        n--;
    }
    if (n == 1) { /* never hand out raw control bytes, except line breaks and tabs */
        unsigned char b = (unsigned char)p[0];
        if ((b < 0x20 && b != '\n' && b != '\t' && b != '\r') || b == 0x7f) n = 0;
    }
    *piece = p;
    *len = (size_t)n;
    return AC_OK;
}

