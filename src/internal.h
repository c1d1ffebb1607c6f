/*
 * internal.h - what the library's source files share and the public header does not show:
 * the model's weight layout, the error helpers, and the few calls one concern makes into
 * another (generation into the forward pass, the sampler into softmax).  Never installed;
 * run.h stays the one public header.
 *
 * Who holds what:
 *   errors.c     thread-local error messages, result-code names, the version
 *   file.c       opening and reading model and tokenizer files
 *   model.c      header parsing and validation, weights and their values, load (read or
 *                mapped), quantize, save
 *   forward.c    the state (KV caches, activations, threads) and the forward pass
 *   tokenizer.c  tokenizer loading, SentencePiece-exact BPE encode, piece decode
 *   sampler.c    greedy / temperature / top-k / top-p with a seeded PRNG
 *   generation.c generation settings (defaults, checks, seeds), the stop rule, stop strings,
 *                the ac_generation object
 *   session.c    sessions (feed / next) and the generate loop
 *   batch.c      batched generation, and a batch driven step by step by its caller
 *   chat.c       chat templates, rendering a conversation into tokens
 *   conversation.c  a conversation's rules (context shift, the reply's text), and a
 *                conversation run on a KV cache of its own
 */
#ifndef ARIANNA_INTERNAL_H
#define ARIANNA_INTERNAL_H

#include "run.h"
#include "testing.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "arianna_c reads little-endian files directly and needs a little-endian host"
#endif

/* ------------------------------------------------------------------------ errors (errors.c) */

/* Records a formatted message for this thread and returns code, so callers can write
 * `return ac_fail(AC_ERR_ARG, "...")`. */
int ac_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Adds text to this thread's message after an ac_fail(), e.g. a hint shared by several
 * errors. */
void ac_append_error(const char *text);
/* Makes the array *buf (*cap items of item bytes each) hold at least need items, doubling
 * from 256; on failure *buf and *cap stay as they were and the AC_ERR_NOMEM message names
 * what.  The library's one realloc, so every growing buffer fails alike. */
int ac_grow(void **buf, size_t *cap, size_t need, size_t item, const char *what);

/* ------------------------------------------------------------------------ files (file.c) */

/* Little-endian fields of the file layouts; memcpy because the bytes may be unaligned. */
static inline int32_t read_i32(const unsigned char *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float read_f32(const unsigned char *p) {
    float v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Opens path read-only and checks it is a regular file; returns its descriptor and size.
 * what ("model", "tokenizer") is used in messages. */
int ac_open_regular_file(const char *path, const char *what, int *fd_out, size_t *size);
/* Reads size bytes of fd from its current offset into buf, through short reads and EINTR.
 * AC_ERR_IO naming path and what on a read error or when the file ends early. */
int ac_read_fully(int fd, void *buf, size_t size, const char *path, const char *what);

/* ------------------------------------------------------------------------ numbers */

/* Checked 64-bit arithmetic: sizes come from untrusted headers, so every product and sum is
 * checked even though the header bounds make overflow impossible today. */
static inline int mul_ok(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}

static inline int add_ok(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_add_overflow(a, b, out);
}

/* The index of the first NaN or infinity in x[0..n), or n if there is none.  Checks blocks
 * with a branch-free comparison the compiler vectorizes (|x| <= FLT_MAX is false for NaN and
 * both infinities) and looks for the exact index only inside a block that has one: this runs
 * over every weight at load and over every logit of every pass. */
static inline size_t first_non_finite(const float *x, size_t n) {
    enum { BLOCK = 1024 };
    for (size_t b = 0; b < n; b += BLOCK) {
        size_t end = n - b < BLOCK ? n : b + BLOCK;
        int finite = 1;
        for (size_t i = b; i < end; i++) finite &= fabsf(x[i]) <= FLT_MAX;
        if (!finite)
            for (size_t i = b; i < end; i++)
                if (!(fabsf(x[i]) <= FLT_MAX)) return i;
    }
    return n;
}

/* x for a message: a NaN without the sign bit printf would show as "-nan". */
static inline double shown_value(float x) { return isnan(x) ? (double)NAN : (double)x; }

/* ------------------------------------------------------------------------ model (model.c) */

/* One layer's weight matrix, (out, in) row-major: float32, or (v2) int8 values with one
 * float scale per group of group_size values along each row. */
typedef struct {
    const float *f;     /* float32 weights, or NULL for int8 */
    const int8_t *q;    /* int8 weights */
    const float *s;     /* (out, in / group_size) scales of q */
    const void *packed; /* q and s in the kernel set's own layout (kernels.h), or NULL */
} ac_matrix;

typedef struct {
    ac_matrix wq, wk, wv, wo, w1, w2, w3;
} ac_layer;

typedef struct {
    ac_matrix token_embedding; /* (V, D) */
    const float *rms_att;      /* (L, D) */
    const float *rms_ffn;      /* (L, D) */
    const float *rms_final;    /* (D) */
    ac_layer *layers;          /* (L) */
    ac_matrix wcls;            /* (V, D): token_embedding when shared */
} ac_weights;

/* The per-layer matrices in file order (each stored for all layers before the next), with
 * their names and shapes: 'D' = dim, 'H' = hidden_dim, 'K' = kv_dim. */
#define AC_N_LAYER_MATRICES 7
typedef struct {
    size_t offset; /* in ac_layer */
    char rows, cols;
    const char *name; /* "wq", ...: tensor names are "layers.<l>.<name>" */
} ac_layer_matrix_info;

extern const ac_layer_matrix_info AC_LAYER_MATRICES[AC_N_LAYER_MATRICES];

/* Matrix i (AC_LAYER_MATRICES order) of a layer. */
static inline ac_matrix *layer_matrix(const ac_layer *layer, int i) {
    return (ac_matrix *)((const char *)layer + AC_LAYER_MATRICES[i].offset);
}

/* The size a shape letter of AC_LAYER_MATRICES stands for. */
static inline int dim_of(const ac_config *c, char which) {
    if (which == 'D') return c->dim;
    if (which == 'H') return c->hidden_dim;
    return c->dim / c->n_heads * c->n_kv_heads;
}

struct ac_model {
    ac_config config;
    ac_weights w;
    const void *data; /* the whole file */
    size_t size;
    int mapped;       /* 1: data is our mmap and is unmapped on free */
    int owned;        /* 1: data is our heap image (a file read in, an int8 quantization, a
                         merge of modules) and is freed */
    void *packed;     /* the int8 matrices in the kernel set's layout (one allocation), or NULL */
};

/* A model over the file image data[0..size) (validated; not copied: it must outlive the
 * model).  name is used in messages.  The caller sets mapped / owned. */
int ac_model_from_bytes(const void *data, size_t size, const char *name, ac_model **out);
/* size bytes (> 0) for a model image the library owns (read from a file, quantized, merged
 * with modules), or NULL; freed with free(). */
void *ac_alloc_model_image(size_t size);

/* ------------------------------------------------------------------------ forward (forward.c) */

/* A state for n_seqs sequences, each with its own KV cache (1 for ac_state_create and
 * sessions, the batch size for ac_batch), running n_threads threads (checked by the caller;
 * 0 = the default), so no other pool is started first. */
int ac_state_create_seqs(const ac_model *m, int n_seqs, int n_threads, ac_state **out);
/* AC_ERR_ARG unless n_threads is a thread count a state accepts (0..AC_MAX_THREADS, 0 = all
 * available cores). */
int ac_check_thread_count(int n_threads);
/* The state's logits buffer: (n_seqs, vocab_size) floats, row r for the r-th row of the
 * last ac_forward_step pass (row 0 for a single sequence). */
float *ac_state_logits(ac_state *s);

/* AC_ERR_RANGE naming the first of tokens[0..n) outside [0, vocab_size). */
int ac_check_tokens(const int *tokens, int n, int vocab_size);

/* Runs tokens[0..n) of sequence seq at positions pos0.. into its cache (prefill, in blocks
 * of matrix-matrix products).  With all_logits out receives every token's logits (n, V);
 * otherwise only the last token's (V).  The caller checked tokens and positions. */
int ac_prefill(ac_state *s, int seq, const int *tokens, int n, int pos0, float *out, int all_logits);
/* One decode step of n (<= n_seqs) sequences in one pass: row r runs tokens[r] at
 * positions[r] of sequence seqs[r] (each sequence at most once); row r's logits go to row
 * r of ac_state_logits(s). */
int ac_forward_step(ac_state *s, const int *seqs, const int *tokens, const int *positions, int n);

/* x = softmax(x); returns the sum of the exponentials: in [1, n] unless x held an infinity
 * or a NaN (then it is NaN and so is every x[i]). */
float ac_softmax(float *x, int n);

/* ------------------------------------------------------------------------ chat (chat.c) */

/* AC_ERR_ARG naming messages[i] when m, as message i of a conversation, has an unknown role,
 * is a system message after the first, or has NULL content of nonzero length. */
int ac_chat_check_message(const ac_chat_message *m, int i);

/* ------------------------------------------------------------------------ generation (generation.c) */

/* One generation's rules, whoever runs the model: the sampler, the stop rule, the stop
 * strings and the text they hold back.  A session owns one, a batch one per sequence, and a
 * caller that runs the model itself (continuous batching) creates its own. */
struct ac_generation {
    const ac_model *model;
    const ac_tokenizer *tok;
    ac_session_params params;
    ac_sampler *sampler;
    int *bias_ids;       /* (n_bias) the logit bias, given again to every new sampler */
    float *bias_values;
    int n_bias;
    char *stop_bytes;    /* the stop strings, one after another */
    size_t *stop_len;    /* (n_stops) their lengths */
    int n_stops;
    char *text;          /* text[held_at..held_at+n_held): bytes that may start a stop string */
    size_t text_cap, held_at, n_held;
    int last;            /* the context's last token (the previous one when decoding); -1 none */
    int filled;          /* positions the context takes, sampled tokens included */
    int n_reported;      /* tokens reported since the generation began */
    ac_stop_reason stop; /* why it ended; AC_STOP_NONE while it goes on */
};

/* Records in `to` the tokens `from` recorded, oldest first (the last repeat_last_n of `to`
 * stay): a sampler that replaces another for the same context keeps its penalties' view. */
void ac_sampler_copy_history(ac_sampler *to, const ac_sampler *from);

/* The seed a sampler starts from: seed itself, or for AC_SEED_RANDOM a fresh one. */
uint64_t ac_resolve_seed(uint64_t seed);
/* A session or batch pairs a model with a tokenizer of the same vocabulary: AC_ERR_MISMATCH
 * otherwise. */
int ac_check_vocab_match(const ac_model *m, const ac_tokenizer *tok);
/* A generation for params (already checked), its sampler seeded with seed (already
 * resolved). */
int ac_generation_create_seeded(const ac_model *m, const ac_tokenizer *tok, const ac_session_params *p,
                                uint64_t seed, ac_generation **out);
/* New settings: a new sampler (the logit bias and stop strings stay), the count starts again. */
int ac_generation_set_params(ac_generation *g, const ac_session_params *p);
/* Forgets the context. */
void ac_generation_reset(ac_generation *g);
/* tokens[0..n) joined the context (now `filled` positions long): the penalties see them, and
 * a new generation starts after them. */
void ac_generation_continue(ac_generation *g, const int *tokens, int n, int filled);
/* The stop rule before sampling: returns 1 (and releases the held bytes) when the generation
 * has ended or ends now. */
int ac_generation_ended(ac_generation *g, const char **piece, size_t *len);
/* Samples the next token from logits (those after the context's last token).  A token that
 * ends the text (BOS/EOS) is not reported: *token is -1 and the held bytes are released. */
int ac_generation_sample(ac_generation *g, const float *logits, int *token, const char **piece, size_t *len);

#endif /* ARIANNA_INTERNAL_H */
