/*
 * run.h - the public C API of arianna_c (libarianna.so).
 *
 * arianna_c runs tiny Llama-architecture models (float32, llama2.c file layouts) on the CPU.
 *
 * Objects (all opaque, each with a create/free pair):
 *   ac_model      an immutable loaded model: config + weights (read into private memory, or
 *                 memory-mapped when asked).
 *   ac_tokenizer  an immutable SentencePiece-style BPE tokenizer (llama2.c tokenizer layout).
 *   ac_state      the mutable working memory of one forward pass: KV cache + activations.
 *   ac_sampler    the mutable sampler: temperature / top-k / top-p / min-p, penalties over
 *                 recent tokens, logit bias, and a seeded PRNG.
 *   ac_generation the rules of one generation, whoever runs the model: sampler, stop rule,
 *                 stop strings.
 *   ac_session    one generation in progress: owns an ac_state and an ac_generation, borrows
 *                 a model and a tokenizer.
 *   ac_batch      N independent generations advanced together (batched decode): each weight
 *                 read serves N tokens.
 *
 * Threads: ac_model and ac_tokenizer are read-only after loading, so any number of threads may
 * share one; ac_state, ac_sampler and ac_session are mutable, so give each thread its own.
 * A model (and tokenizer) must outlive every state/session created from it.
 *
 * Errors: every function that can fail returns an int result code (AC_OK = 0, the AC_ERR_*
 * values below).  On failure the library also records a human-readable message for the
 * calling thread, read with ac_last_error().  The message names the file, the field, and the
 * expected vs actual values where that applies.  The library never exits, and prints only
 * one line to stderr, when the AC_KERNEL variable names a kernel set it cannot use.
 */
#ifndef ARIANNA_RUN_H
#define ARIANNA_RUN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define AC_API __declspec(dllexport)
#else
#define AC_API __attribute__((visibility("default")))
#endif

/* The library's version, and its ABI number: it changes whenever a declaration below changes
 * incompatibly, and bindings compare it with ac_abi_version() when they load the library. */
#define AC_VERSION_MAJOR 0
#define AC_VERSION_MINOR 4
#define AC_VERSION_PATCH 0
#define AC_ABI_VERSION 3

/* ------------------------------------------------------------------------ result codes */

enum {
    AC_OK = 0,
    AC_ERR_IO = 1,        /* a file could not be opened, sized, mapped or read */
    AC_ERR_FORMAT = 2,    /* a file's bytes do not follow its layout (header, sizes, lengths) */
    AC_ERR_MISMATCH = 3,  /* two valid inputs disagree (tokenizer pieces vs model vocab_size) */
    AC_ERR_ARG = 4,       /* a bad argument: NULL pointer, NaN temperature, top_p out of (0,1] */
    AC_ERR_NOMEM = 5,     /* an allocation failed */
    AC_ERR_RANGE = 6,     /* a value out of range: token id, position, sequence too long */
    AC_ERR_NUMERIC = 7    /* numbers the arithmetic cannot carry: a forward pass gave NaN or
                             infinite logits (finite weights so large that float32
                             overflows; nothing is sampled from them), or int8 quantization
                             would zero the embedding or the classifier */
};

/* Special token ids of every tokenizer arianna_c reads. */
enum { AC_TOKEN_UNK = 0, AC_TOKEN_BOS = 1, AC_TOKEN_EOS = 2 };

/* Sanity bounds a model header must respect (checked before anything is sized from it). */
#define AC_MAX_DIM 65536
#define AC_MAX_HIDDEN_DIM (1 << 20)
#define AC_MAX_LAYERS 1024
#define AC_MIN_VOCAB 3 /* the special pieces <unk>, <s>, </s> */
#define AC_MAX_VOCAB (1 << 24)
#define AC_MAX_SEQ_LEN (1 << 20)
/* Most threads one state may use, and most sequences one batch may hold. */
#define AC_MAX_THREADS 256
#define AC_MAX_BATCH 1024
/* int8 (Q8_0) quantization: values per group sharing one float scale. */
#define AC_DEFAULT_GROUP_SIZE 32
/* Longest tokenizer piece accepted, in bytes. */
#define AC_MAX_PIECE_BYTES 65536

/* The message of the last failed call on this thread ("" if none). Valid until the next
 * failing call on the same thread. */
AC_API const char *ac_last_error(void);
/* The symbolic name of a result code, e.g. "AC_ERR_FORMAT". */
AC_API const char *ac_strerror(int code);
/* The library's version as text, "MAJOR.MINOR.PATCH" (e.g. "0.4.0"). */
AC_API const char *ac_version(void);
/* The same as one number: MAJOR * 10000 + MINOR * 100 + PATCH (0.4.0 is 400). */
AC_API int ac_version_number(void);
/* AC_ABI_VERSION of the library as built (a binding written for another ABI must not use it). */
AC_API int ac_abi_version(void);

/* ------------------------------------------------------------------------ model */

typedef struct ac_model ac_model;

typedef struct {
    int dim;               /* transformer width */
    int hidden_dim;        /* FFN width */
    int n_layers;
    int n_heads;           /* query heads */
    int n_kv_heads;        /* key/value heads (n_heads % n_kv_heads == 0) */
    int vocab_size;
    int seq_len;           /* maximum context: the KV cache holds this many positions */
    int shared_classifier; /* 1: logits use the token embedding; 0: a separate wcls matrix */
    int version;           /* file layout: 0 = legacy llama2.c, 1 = "ak42" v1 (float32),
                              2 = "ak42" v2 (int8) */
    int group_size;        /* int8 weights (v2): values per scale group; 0 = float32 weights */
} ac_config;

/* How ac_model_load_file brings the file into memory. */
typedef struct {
    int use_mmap; /* 0 (default): read the whole file into private memory, so the model never
                     changes and never faults when the file is truncated or rewritten while it
                     is loaded.  1: map it read-only instead (pages are loaded on first use and
                     shared with other processes mapping the file); the file must then not be
                     changed or truncated until ac_model_free: a truncated file kills the
                     process with SIGBUS, rewritten bytes show up in the running model. */
} ac_model_load_params;

/* use_mmap 0. */
AC_API ac_model_load_params ac_model_default_load_params(void);

/* Loads the model file at path (params may be NULL for the defaults), validates it, and
 * returns a model in *out.  A path that is not a regular file (directory, FIFO, device) is
 * AC_ERR_IO, refused without blocking.  The header is checked before the file is read.
 * Layout detected by the first four bytes: "ak42" (0x616b3432) = v1 or v2 (the version field
 * that follows), anything else = v0.
 *
 * Weights are checked too: a NaN or infinite value in any tensor, or an int8 scale that is
 * NaN, infinite or negative (or zero for a group with non-zero values) is AC_ERR_FORMAT
 * naming the tensor ("layers.3.wq") and the index of the first bad value; so is an
 * all-zero token_embedding, rms_final or separate wcls (every token would get the same
 * logits).  Header bytes after the last field (37..255 in v1, 41..255 in v2) must be zero.
 *
 * v2 (llama2.c's int8 "version 2" layout): the 256-byte header holds the magic, int32 2, the
 * seven int32 params, uint8 shared_classifier and int32 group_size (at byte 37), then zeros;
 * then float32 rms_att (all layers), rms_ffn (all layers), rms_final; then each matrix as
 * its int8 values followed by its float32 group scales (scale = max|w| / 127 over a group
 * of group_size values along a row): token_embedding, then wq, wk, wv, wo, w1, w2, w3 for
 * every layer in turn (all layers of one before the next), then wcls when not shared. */
AC_API int ac_model_load_file(const char *path, const ac_model_load_params *params, ac_model **out);
/* ac_model_load_file with the default params (the file is read, not mapped). */
AC_API int ac_model_load(const char *path, ac_model **out);
/* Same checks, from a caller's buffer (not copied: it must stay valid and unchanged until
 * ac_model_free).  data must be 4-byte aligned.  name (may be NULL) is used in messages. */
AC_API int ac_model_load_memory(const void *data, size_t size, const char *name, ac_model **out);
AC_API void ac_model_free(ac_model *model);
AC_API int ac_model_config(const ac_model *model, ac_config *out);

/* A new int8 model (v2 layout, in memory) quantized from the float32 model src, with
 * group_size values per scale (0 = AC_DEFAULT_GROUP_SIZE; it must divide dim and hidden_dim
 * and be a multiple of 4).  src may be freed afterwards.  Matrix products then run in int8
 * with the activations quantized per group on the fly.  AC_ERR_ARG if src is already int8;
 * AC_ERR_FORMAT if src's weights are no longer all finite (a changed ac_model_load_memory
 * buffer): quantizing would silently turn NaN into 0.  AC_ERR_NUMERIC if the embedding or a
 * separate classifier holds only values too small for an int8 scale (below about 1e-43):
 * quantized, every token would get the same logits. */
AC_API int ac_model_quantize(const ac_model *src, int group_size, ac_model **out);
/* Writes the model's file (its own layout: a quantized model is written as v2) to path,
 * through a temporary path + ".tmp" renamed over path. */
AC_API int ac_model_save(const ac_model *model, const char *path);

/* ------------------------------------------------------------------------ performance */

/* The compute kernels in use, the best set this CPU runs, chosen once: "avx512-amx"
 * (AVX-512F/BW/VL + AVX-512 VNNI + AMX-INT8, with Linux granting the tiles), "avx512-vnni"
 * (AVX-512F/BW/VL + AVX-512 VNNI), "avx512" (AVX-512F/BW/VL), "avx2-vnni" (AVX2 + FMA +
 * AVX-VNNI), "avx2" (AVX2 + FMA) or "scalar" (portable C, any CPU).  AC_KERNEL=NAME in the
 * environment forces one of them; a set this CPU lacks (or an unknown name) keeps the
 * automatic choice and prints one line on stderr saying so. */
AC_API const char *ac_kernel_name(void);
/* The default thread count: the CPUs this process may run on (capped at AC_MAX_THREADS). */
AC_API int ac_default_threads(void);

/* ------------------------------------------------------------------------ forward pass */

typedef struct ac_state ac_state;

/* Allocates the KV cache and activation buffers for one sequence of up to seq_len tokens,
 * with ac_default_threads() threads. */
AC_API int ac_state_create(const ac_model *model, ac_state **out);
AC_API void ac_state_free(ac_state *state);
/* Threads for this state's matrix products and attention (1..AC_MAX_THREADS; 0 = the
 * default).  Results do not depend on it.  Idle threads spin ~2 ms, then sleep. */
AC_API int ac_state_set_threads(ac_state *state, int n_threads);

/* One decoding step: runs token at position pos (0 <= pos < seq_len) through the model,
 * storing its keys/values in the cache, and points *logits (may be NULL) at the vocab_size
 * logits inside the state (valid until the next call on this state).  Positions 0..pos-1
 * must have been run before on this state; that is the caller's contract.  AC_ERR_NUMERIC
 * (naming the position and the first bad logit; *logits not set) when a logit is NaN or
 * infinite; so do ac_logits, the session and batch calls that run the model, and
 * ac_generate, which then stops without sampling. */
AC_API int ac_forward(ac_state *state, int token, int pos, const float **logits);

/* Logits for every position of tokens[0..n_tokens-1], run from position 0 through the KV
 * cache (so the state's previous contents are replaced).  out receives n_tokens * vocab_size
 * floats, row t = logits after token t.  n_tokens must be <= seq_len.  The tokens go through
 * the layers together (prefill: matrix-matrix products, causal attention over the cache). */
AC_API int ac_logits(ac_state *state, const int *tokens, int n_tokens, float *out);

/* ------------------------------------------------------------------------ tokenizer */

typedef struct ac_tokenizer ac_tokenizer;

/* Loads a llama2.c-layout tokenizer file holding exactly vocab_size pieces (the model's
 * vocab_size, AC_MIN_VOCAB..AC_MAX_VOCAB) and nothing after them.  Like ac_model_load, a
 * path that is not a regular file (directory, FIFO, device) is AC_ERR_IO, without blocking. */
AC_API int ac_tokenizer_load(const char *path, int vocab_size, ac_tokenizer **out);
/* Same from memory; the bytes are copied, so the buffer may be freed after the call. */
AC_API int ac_tokenizer_load_memory(const void *data, size_t size, int vocab_size,
                                    const char *name, ac_tokenizer **out);
AC_API void ac_tokenizer_free(ac_tokenizer *tok);
AC_API int ac_tokenizer_vocab_size(const ac_tokenizer *tok);

/* Encodes text[0..len) (UTF-8; invalid bytes become byte tokens) exactly as SentencePiece
 * encodes with a byte-fallback, identity-normalized BPE model with a dummy prefix.  bos/eos
 * (0 or 1) add token 1 in front / token 2 at the end.  Writes up to max_tokens ids to tokens
 * and the count to *n_tokens.  A capacity of len + 3 always suffices; when max_tokens is too
 * small nothing is written, *n_tokens receives the count needed, and AC_ERR_RANGE returns. */
AC_API int ac_encode(const ac_tokenizer *tok, const char *text, size_t len, int bos, int eos,
                     int *tokens, int max_tokens, int *n_tokens);

/* The bytes that token contributes to decoded text when it follows prev: byte pieces
 * "<0xNN>" give the raw byte; after BOS the piece's leading space is dropped; special tokens
 * (0..2) and whole single-byte control pieces (other than \n \t \r) give nothing.  *piece
 * points into the tokenizer (valid while it lives), not NUL-terminated; *len is its length. */
AC_API int ac_decode_piece(const ac_tokenizer *tok, int prev, int token, const char **piece,
                           size_t *len);

/* The raw stored text of piece id (as in the file, e.g. "<0x0A>", " the") and its score. */
AC_API int ac_tokenizer_piece(const ac_tokenizer *tok, int id, const char **piece, size_t *len,
                              float *score);

/* The tokenizer file to load for a model, the one lookup order of every front end: a name
 * tries NAME, NAME.bin, then (a relative NAME) both in model_path's folder; no name (NULL)
 * tries the default names in model_path's folder (ac_tokenizer_lookup says which, in order).  The first candidate that
 * exists (whatever it is: a directory is chosen and then refused by ac_tokenizer_load) is
 * written to buf (cap bytes, NUL-terminated).  model_path may be NULL (a model loaded from
 * memory): then only a name can be looked up.  AC_ERR_IO when no candidate exists (the
 * message lists every path tried), AC_ERR_RANGE when buf is too small. */
AC_API int ac_tokenizer_path(const char *model_path, const char *name, char *buf, size_t cap);

/* The lookup without a name, in words, for help texts: "tokenizer.bin, then tok4096.bin in the
 * model's folder" (a static string). */
AC_API const char *ac_tokenizer_lookup(void);

/* ------------------------------------------------------------------------ chat templates */

/* A chat template: how a conversation becomes the text a model continues (src/chat.c holds
 * the table: "qa", "llama-2", "chatml").  Each format holds "{content}" where the message
 * goes; "<s>" / "</s>" in a format (never in a message) are the BOS / EOS tokens. */
#define AC_CHAT_MAX_STOPS 4
typedef struct {
    const char *name;
    const char *system;     /* a system message (it may only come first) */
    const char *user;       /* a user message */
    const char *assistant;  /* an assistant message: a reply already given */
    const char *generation; /* opens the reply the model is to write */
    const char *user_first; /* the first user message after a system prompt, "{system}" holding
                               the system format's text (markers dropped); NULL: the system
                               message comes on its own */
    const char *marker;     /* a piece whose presence in a vocabulary makes this template the
                               default there; NULL */
    const char *stop[AC_CHAT_MAX_STOPS]; /* text that ends a reply besides BOS/EOS; NULL after
                                            the last */
} ac_chat_template;

/* One message: role "system", "user" or "assistant"; content_len bytes of content. */
typedef struct {
    const char *role;
    const char *content;
    size_t content_len;
} ac_chat_message;

/* The templates, in the table's order (0..ac_chat_template_count()-1; NULL outside). */
AC_API int ac_chat_template_count(void);
AC_API const ac_chat_template *ac_chat_template_at(int i);
/* The template called name; NULL (ac_last_error lists the known names) for any other. */
AC_API const ac_chat_template *ac_chat_template_get(const char *name);
/* The template a vocabulary suggests: the first whose marker piece it holds (ChatML for an
 * <|im_start|> piece), else the default, "qa".  Model files carry no chat metadata, so the
 * vocabulary is the only hint.  pieces[i] is lens[i] bytes; NULL / 0 pieces: the default. */
AC_API const ac_chat_template *ac_chat_template_for_vocab(const char *const *pieces, const size_t *lens, int n);
/* The same for the pieces of tok (NULL: the default). */
AC_API const ac_chat_template *ac_chat_template_for(const ac_tokenizer *tok);

/* Receives each part of a rendered prompt in order: a special token (token >= 0, text NULL),
 * or text (token -1) to be encoded on its own (no BOS).  Returns AC_OK, or a code that ends
 * the rendering (ac_chat_render returns it). */
typedef int (*ac_chat_part_fn)(void *user, int token, const char *text, size_t len);
/* Renders messages[0..n) in template t, then (add_generation_prompt != 0) the opening of the
 * reply, as parts: BOS first (unless the template starts with its own), adjacent text joined.
 * AC_ERR_ARG naming the message for no messages, an unknown role, or a system message that
 * is not the first. */
AC_API int ac_chat_render(const ac_chat_template *t, const ac_chat_message *messages, int n,
                          int add_generation_prompt, ac_chat_part_fn on_part, void *user);
/* The token ids of ac_chat_render's parts (each text part encoded with ac_encode, no BOS):
 * up to max_tokens into tokens, the count into *n_tokens.  When they do not fit, *n_tokens is
 * the count needed and AC_ERR_RANGE returns. */
AC_API int ac_chat_tokens(const ac_chat_template *t, const ac_tokenizer *tok, const ac_chat_message *messages,
                          int n, int add_generation_prompt, int *tokens, int max_tokens, int *n_tokens);

/* ------------------------------------------------------------------------ sampler */

typedef struct ac_sampler ac_sampler;

typedef struct {
    float temperature; /* 0 = greedy argmax; > 0 = sample softmax(logits / temperature) */
    float top_p;       /* nucleus threshold in (0, 1]; 1 = off */
    int top_k;         /* keep the k most likely tokens (applied before top_p); 0 = off */
    uint64_t seed;     /* PRNG seed; 0 selects a fixed default seed (sessions and batches
                          draw a fresh one for AC_SEED_RANDOM) */
    /* The fields below are neutral when zero, so a zeroed struct samples as before they
     * existed; llama.cpp's names and meanings. */
    float min_p;             /* after top-k/top-p, keep the tokens whose probability (before
                                temperature) is >= min_p * the best one's; 0 = off */
    float repeat_penalty;    /* tokens among the last repeat_last_n recorded (ac_sampler_accept):
                                a positive logit divided by it, a negative one multiplied;
                                1 = off (0, a zeroed struct's value, is off too) */
    int repeat_last_n;       /* the window of recent tokens the penalties look at; 0 = none */
    float presence_penalty;  /* subtracted once from the logit of every token in the window */
    float frequency_penalty; /* subtracted from a token's logit per occurrence in the window */
} ac_sampler_params;

/* temperature 0.8, top_p 0.9, top_k 0, seed 0, min_p 0, repeat_penalty 1.1,
 * repeat_last_n 64, presence_penalty 0, frequency_penalty 0. */
AC_API ac_sampler_params ac_sampler_default_params(void);
/* AC_ERR_ARG for temperature < 0 or NaN, top_p outside (0, 1], top_k < 0, min_p outside
 * [0, 1], repeat_penalty < 0 or not finite, repeat_last_n outside 0..AC_MAX_SEQ_LEN,
 * presence or frequency penalty not finite; AC_OK otherwise.  ac_sampler_create checks the
 * same. */
AC_API int ac_sampler_check_params(const ac_sampler_params *params);
AC_API int ac_sampler_create(const ac_sampler_params *params, int vocab_size, ac_sampler **out);
AC_API void ac_sampler_free(ac_sampler *sampler);
/* Picks a token from vocab_size logits (not modified): logit bias and penalties first, then
 * temperature, top-k, top-p, min-p.  Deterministic for a given seed and history. */
AC_API int ac_sample(ac_sampler *sampler, const float *logits, int *token);
/* Records token as the latest of the context the penalties look at (its last repeat_last_n
 * tokens): prompt tokens and sampled ones alike.  A no-op when repeat_last_n is 0. */
AC_API int ac_sampler_accept(ac_sampler *sampler, int token);
/* Forgets the recorded tokens (e.g. before recording a rewound context again); the PRNG
 * goes on where it was. */
AC_API void ac_sampler_reset_history(ac_sampler *sampler);
/* Adds biases[i] to the logit of token ids[i] at every draw (OpenAI's logit_bias; -INFINITY
 * bans a token; repeated ids add up); replaces the previous set, n = 0 clears it.
 * AC_ERR_RANGE for an id outside the vocabulary, AC_ERR_ARG for a NaN or +inf bias. */
AC_API int ac_sampler_set_logit_bias(ac_sampler *sampler, const int *ids, const float *biases, int n);

/* Log-probabilities of the model's distribution softmax(logits) (no temperature, bias or
 * penalty): *token_logprob (may be NULL) that of token, and the top_n (0..n_vocab) most
 * likely tokens' ids and log-probabilities in top_ids / top_logprobs, most likely first,
 * equal ones in increasing id order.  AC_ERR_RANGE if a logit is NaN or +inf, or every one
 * is -inf. */
AC_API int ac_logprobs(const float *logits, int n_vocab, int token, int top_n, float *token_logprob,
                       int *top_ids, float *top_logprobs);

/* ------------------------------------------------------------------------ generation */

typedef struct ac_session ac_session;

/* The seed that makes a session (or batch) draw a fresh random seed when it is created or
 * its settings change, different for every session. */
#define AC_SEED_RANDOM UINT64_MAX
/* Tokens a generation reports at most unless told otherwise. */
#define AC_DEFAULT_MAX_NEW_TOKENS 256
/* Most stop strings one generation holds, and the longest one in bytes. */
#define AC_MAX_STOPS 64
#define AC_MAX_STOP_BYTES 4096

/* Everything a generation is told: how to sample, when to stop, how many threads. */
typedef struct {
    ac_sampler_params sampler; /* temperature, top_p, top_k, seed (AC_SEED_RANDOM: a fresh one) */
    int max_new_tokens;        /* tokens reported after each feed at most (>= 0); prompt +
                                  generated never exceed seq_len, so more is the same as that */
    int n_threads;             /* threads of the forward pass, 1..AC_MAX_THREADS; 0 = all
                                  available cores.  Results do not depend on it. */
    int ignore_eos;            /* nonzero: BOS/EOS do not end the text; they are reported
                                  (empty pieces) and run like any token, e.g. to time a fixed
                                  number of tokens */
} ac_session_params;

/* ac_sampler_default_params() with seed AC_SEED_RANDOM, max_new_tokens
 * AC_DEFAULT_MAX_NEW_TOKENS, n_threads 0, ignore_eos 0: the defaults of the CLI, the Python
 * package and the NumPy reference. */
AC_API ac_session_params ac_session_default_params(void);
/* AC_ERR_ARG naming the first bad setting (ac_sampler_check_params's, max_new_tokens < 0,
 * n_threads outside 0..AC_MAX_THREADS): the checks of ac_session_create,
 * ac_session_set_params and ac_batch_create, without creating anything. */
AC_API int ac_session_check_params(const ac_session_params *params);

/* Why a generation ended (ac_session_stop_reason, ac_batch_result.stop). */
typedef enum {
    AC_STOP_NONE = 0,    /* it has not ended (or nothing was fed yet) */
    AC_STOP_END = 1,     /* the model ended the text: it sampled BOS or EOS (not with ignore_eos) */
    AC_STOP_LENGTH = 2,  /* max_new_tokens tokens were reported */
    AC_STOP_CONTEXT = 3, /* the context is full: prompt + generated tokens reached seq_len */
    AC_STOP_CALLER = 4,  /* the caller stopped it: an ac_generate callback returned nonzero */
    AC_STOP_STRING = 5   /* a stop string came (it is not part of the text) */
} ac_stop_reason;

/* Stop strings (all generations: sessions, batches, ac_generation): the text ends before the
 * first of them to appear in the decoded bytes, and no part of one is ever reported: bytes
 * that may be the start of a stop string are held back until they cannot (then they come
 * with a later piece) or until the generation ends otherwise (then they come with the call
 * that says so); when a stop string completes they are dropped with it.  The tokens stay
 * the sampled ones (the stop string's included). */

/* ------------------------------------------------------------------------ generation rules */

/* The rules of one generation without a model: for a caller that runs the model itself (e.g.
 * many generations sharing ac_batch_decode steps) and hands over each step's logits.  The
 * results are those of a session given the same context, settings and logits. */
typedef struct ac_generation ac_generation;

/* params may be NULL for ac_session_default_params() (n_threads is not used). */
AC_API int ac_generation_create(const ac_model *model, const ac_tokenizer *tok,
                                const ac_session_params *params, ac_generation **out);
AC_API void ac_generation_free(ac_generation *gen);
/* Replaces the stop strings (n = 0: none): stops[i] is lens[i] bytes (1..AC_MAX_STOP_BYTES),
 * n at most AC_MAX_STOPS.  Kept for every later generation; bytes held back are dropped. */
AC_API int ac_generation_set_stops(ac_generation *gen, const char *const *stops, const size_t *lens, int n);
/* Replaces the logit bias (as ac_sampler_set_logit_bias; kept for every later generation). */
AC_API int ac_generation_set_logit_bias(ac_generation *gen, const int *ids, const float *biases, int n);
/* A new generation after context[0..n_context) (1..seq_len tokens, BOS first as a rule): the
 * penalties see its last repeat_last_n tokens, the first piece is decoded after its last
 * token, and the stop rule counts its positions.  It may end at once (max_new_tokens 0, a
 * full context): ac_generation_stop_reason says so. */
AC_API int ac_generation_begin(ac_generation *gen, const int *context, int n_context);
/* Samples the next token from logits (vocab_size floats: those after the context's last
 * token, then after each token reported), into *token, and points *piece / *len at the text
 * that is final now (valid until the next call on gen).  When the generation ends before a
 * token is reported (BOS/EOS sampled, or it had ended), *token is -1 and *piece holds the
 * bytes held back, if any.  When the reported token itself ends it (a stop string, or
 * max_new_tokens / the context reached with it), ac_generation_stop_reason says so at once
 * and the piece includes the held bytes: there is no need to run that token. */
AC_API int ac_generation_next(ac_generation *gen, const float *logits, int *token, const char **piece,
                              size_t *len);
/* Ends the generation now (AC_STOP_CALLER, held bytes dropped) unless it has ended. */
AC_API void ac_generation_cancel(ac_generation *gen);
AC_API ac_stop_reason ac_generation_stop_reason(const ac_generation *gen);

/* A session owns an ac_state and an ac_sampler; model and tokenizer are borrowed (they must
 * outlive it).  params may be NULL for ac_session_default_params(). */
AC_API int ac_session_create(const ac_model *model, const ac_tokenizer *tok,
                             const ac_session_params *params, ac_session **out);
AC_API void ac_session_free(ac_session *session);
/* New settings for the next ac_session_next: the sampler starts again from params' seed,
 * the count towards max_new_tokens starts again, the context is kept (and so are the
 * penalties' recent tokens, those the previous settings' repeat_last_n window held). */
AC_API int ac_session_set_params(ac_session *session, const ac_session_params *params);
/* Stop strings and logit bias, as ac_generation_set_stops / ac_generation_set_logit_bias:
 * kept across feeds, resets and new settings until replaced. */
AC_API int ac_session_set_stops(ac_session *session, const char *const *stops, const size_t *lens, int n);
AC_API int ac_session_set_logit_bias(ac_session *session, const int *ids, const float *biases, int n);
/* Forgets the context: the next feed starts at position 0. */
AC_API void ac_session_reset(ac_session *session);
/* Current number of positions in the KV cache. */
AC_API int ac_session_position(const ac_session *session);
/* Encodes text (with BOS when bos != 0) and runs its tokens at the current position (after
 * the last sampled token, if any); a new generation starts (see ac_session_next).
 * AC_ERR_RANGE when they would not fit in seq_len, and then nothing is run. */
AC_API int ac_session_feed(ac_session *session, const char *text, size_t len, int bos);
/* Runs the given token ids at the current position, like ac_session_feed. */
AC_API int ac_session_feed_tokens(ac_session *session, const int *tokens, int n_tokens);
/* Runs the last sampled token (if any), then samples the next one into *token and points
 * *piece and *len (either may be NULL) at its decoded bytes (with stop strings: the text
 * final now, see "Stop strings").  When the generation has ended *token is -1, *piece holds
 * the bytes held back for the stop strings (empty without them) and ac_session_stop_reason()
 * says why; it stays ended until the next feed or ac_session_set_params.  A stop string
 * ends it at once (AC_STOP_STRING with the token that completes it); max_new_tokens and a
 * full context are seen by the next call.  *token is also -1 (AC_STOP_NONE) when nothing
 * was fed. */
AC_API int ac_session_next(ac_session *session, int *token, const char **piece, size_t *len);
/* Why the session's generation ended, AC_STOP_NONE while it goes on. */
AC_API ac_stop_reason ac_session_stop_reason(const ac_session *session);
/* Up to max_tokens (>= 1) steps of ac_session_next in one call: the tokens' bytes, and at the
 * end the bytes held back for the stop strings, gathered at *text / *len (a buffer of the
 * session's, valid until the next call on it).  *n_generated (may be NULL) receives the number
 * of tokens; fewer than max_tokens means the generation has ended (ac_session_stop_reason
 * says why; an error returns the text up to it).  For callers to whom each call costs, e.g.
 * Python's generate(): the tokens in between never leave C. */
AC_API int ac_session_next_text(ac_session *session, int max_tokens, const char **text, size_t *len,
                                int *n_generated);

/* Called once per generated token with its decoded bytes (len may be 0), and once more with
 * token -1 when the generation ends with bytes held back for the stop strings.  Return
 * nonzero to stop generating. */
typedef int (*ac_piece_fn)(void *user, int token, const char *piece, size_t len);

/* Resets the session, feeds BOS + the encoded prompt (an empty prompt starts from BOS alone),
 * then calls on_piece (may be NULL) for each token ac_session_next reports until the
 * generation ends (ac_session_stop_reason says why; AC_STOP_CALLER when on_piece returned
 * nonzero).  A prompt whose tokens (with BOS) exceed seq_len fails with AC_ERR_RANGE.
 * *n_generated (may be NULL) receives the number of tokens reported. */
AC_API int ac_generate(ac_session *session, const char *prompt, size_t len, ac_piece_fn on_piece,
                       void *user, int *n_generated);

/* ------------------------------------------------------------------------ batched generation */

typedef struct ac_batch ac_batch;

/* n_seqs (1..AC_MAX_BATCH) sequences with their own KV caches and samplers; sequence i
 * samples with seed + i, as a session with that seed would (an AC_SEED_RANDOM seed draws
 * one random base first).  params (NULL for the defaults) also give max_new_tokens,
 * n_threads and ignore_eos.  Each decode step runs every unfinished sequence's token in one
 * forward pass. */
AC_API int ac_batch_create(const ac_model *model, const ac_tokenizer *tok, int n_seqs,
                           const ac_session_params *params, ac_batch **out);
AC_API void ac_batch_free(ac_batch *batch);
/* Tokens per sequence that ac_batch_generate's tokens buffer must hold: max_new_tokens, or
 * fewer when seq_len leaves no room for that many (prompt + generated <= seq_len). */
AC_API int ac_batch_max_tokens(const ac_batch *batch);

/* What ac_batch_generate reports for each sequence. */
typedef struct {
    int n_generated;       /* tokens written */
    int last_prompt_token; /* decode the first generated token after this one (ac_decode_piece) */
    ac_stop_reason stop;   /* why the sequence ended */
    size_t text_len;       /* the text: the first text_len bytes of the tokens' decoded pieces
                              (all of them unless a stop string cut it) */
} ac_batch_result;

/* Sequence i continues prompts[i] (lens[i] bytes, BOS in front) exactly as ac_generate would
 * with seed + i: same tokens, same stop.  Its tokens go to tokens[i * ac_batch_max_tokens()
 * ...] (tokens may be NULL when that is 0), what ended it to results[i]. */
AC_API int ac_batch_generate(ac_batch *batch, const char *const *prompts, const size_t *lens,
                             int *tokens, ac_batch_result *results);
/* Stop strings and logit bias of every sequence (as ac_session_set_stops / _set_logit_bias). */
AC_API int ac_batch_set_stops(ac_batch *batch, const char *const *stops, const size_t *lens, int n);
AC_API int ac_batch_set_logit_bias(ac_batch *batch, const int *ids, const float *biases, int n);

/* Step by step (continuous batching): the caller decides what each sequence runs and samples
 * from the returned logits itself (ac_sample with a sampler of its own), so sequences may
 * start, stop and be reused at any step.  A sequence's output equals a lone session's on the
 * same tokens, bit for bit, whatever else runs in the same step.
 *
 * ac_batch_prefill runs tokens[0..n_tokens) of sequence seq at positions pos..pos+n-1
 * (positions before pos must hold that sequence's earlier tokens; anything after is
 * forgotten, so a smaller pos rewinds) and writes the last token's logits to logits
 * (vocab_size floats; may be NULL).  AC_ERR_RANGE past seq_len. */
AC_API int ac_batch_prefill(ac_batch *batch, int seq, const int *tokens, int n_tokens, int pos,
                            float *logits);
/* One decode step: row r runs tokens[r] at position pos[r] of sequence seqs[r] (distinct
 * sequences, 1 <= n_rows <= the batch's n_seqs), all rows in one forward pass, and writes
 * that row's logits to logits + r * vocab_size. */
AC_API int ac_batch_decode(ac_batch *batch, int n_rows, const int *seqs, const int *tokens,
                           const int *pos, float *logits);

/* ------------------------------------------------------------------------ conversations */

/* A chat conversation and its rules, the same for ./run -m chat, the Python package's Chat
 * and the server (src/conversation.c):
 *   - Context shift: a new user turn is rendered with the whole conversation (the template's
 *     ac_chat_tokens).  While that prompt plus room for the reply (min(max_new_tokens,
 *     seq_len / 2) tokens) exceeds seq_len, the oldest exchange after the system prompt (a
 *     user turn and its reply) is left out; the system prompt always stays.  A prompt that,
 *     with only the system prompt and the turn left, leaves no position for the reply is
 *     refused with AC_ERR_RANGE, and the conversation stays as it was.
 *   - The reply ends at the template's stop strings (besides BOS/EOS and the caller's).
 *   - The reply's text: the whitespace the template leaves before it (the characters of
 *     Python's str.isspace) is dropped, and ill-formed UTF-8 becomes U+FFFD as Python
 *     decodes it with errors="replace".  When the reply ends, the turn and that text join the
 *     conversation (and the exchanges left out leave it).
 * Either the conversation runs the model on a KV cache of its own (ac_conversation_say and
 * ac_conversation_next: only the tokens after the prefix the new prompt shares with the
 * context are run), or the caller runs it (ac_conversation_prompt, then ac_conversation_reply
 * with the generated bytes). */
typedef struct ac_conversation ac_conversation;

/* An empty conversation in template t (NULL: ac_chat_template_for(tok)); model and tok are
 * borrowed (they must outlive it).  AC_ERR_MISMATCH when tok does not fit the model. */
AC_API int ac_conversation_create(const ac_model *model, const ac_tokenizer *tok, const ac_chat_template *t,
                                  ac_conversation **out);
AC_API void ac_conversation_free(ac_conversation *c);
AC_API const ac_chat_template *ac_conversation_template(const ac_conversation *c);
/* Appends a message as it is (a copy of content[0..len)): a system prompt first, or an
 * earlier exchange.  AC_ERR_ARG for an unknown role, a system message that is not the first,
 * or while a turn waits for its reply. */
AC_API int ac_conversation_add(ac_conversation *c, const char *role, const char *content, size_t len);
/* The messages so far (message i: NULL outside 0..n-1; valid until the conversation changes;
 * contents are NUL-terminated). */
AC_API int ac_conversation_n_messages(const ac_conversation *c);
AC_API const ac_chat_message *ac_conversation_message(const ac_conversation *c, int i);
/* Stop strings that end every reply besides the template's (as ac_generation_set_stops: kept
 * until replaced, checked now). */
AC_API int ac_conversation_set_stops(ac_conversation *c, const char *const *stops, const size_t *lens, int n);

/* What a turn took. */
typedef struct {
    int n_prompt;       /* tokens of the prompt the reply continues (0 when refused) */
    int n_conversation; /* tokens of the whole conversation with the turn, nothing left out */
    int n_dropped;      /* messages the context shift leaves out, oldest first */
    int n_cached;       /* ac_conversation_say: tokens of the prompt already in the KV cache
                           (not run again) */
} ac_conversation_turn;

/* The user's turn (len bytes) fitted into the context for a reply of up to
 * params->max_new_tokens (params NULL: ac_session_default_params(); all of it is checked as
 * ac_session_check_params does), and its prompt in *tokens (turn->n_prompt ids, valid until
 * the next call on c).  The turn then waits for its reply (ac_conversation_reply); a turn
 * still waiting is forgotten.  turn may be NULL.  AC_ERR_RANGE (turn->n_conversation set)
 * when the turn does not fit, see "Context shift". */
AC_API int ac_conversation_prompt(ac_conversation *c, const ac_session_params *params, const char *user,
                                  size_t len, const int **tokens, ac_conversation_turn *turn);
/* The next bytes the reply's generation gave (piece may be NULL when len is 0; final != 0:
 * the generation has ended): *text / *text_len the reply's text final now (whole characters,
 * cleaned; valid until the next call on c).  With final, the turn and its reply join the
 * conversation.  AC_ERR_ARG when no turn waits. */
AC_API int ac_conversation_reply(ac_conversation *c, const char *piece, size_t len, int final, const char **text,
                                 size_t *text_len);

/* ac_conversation_prompt, then the reply's generation on the conversation's own KV cache:
 * the prompt's tokens after the prefix it shares with the context are run, and a generation
 * with params (its sampler from params' seed again, n_threads for the forward pass) starts,
 * ending at the template's stop strings and those of ac_conversation_set_stops. */
AC_API int ac_conversation_say(ac_conversation *c, const ac_session_params *params, const char *user, size_t len,
                               ac_conversation_turn *turn);
/* Generates the reply's next token into *token and points *text / *len at the reply's text
 * final now (as ac_conversation_reply).  When the reply has ended, *token is -1 (the text may
 * hold its last bytes), the turn has joined the conversation and ac_conversation_stop_reason
 * says why; *token is also -1 when no reply is being generated. */
AC_API int ac_conversation_next(ac_conversation *c, int *token, const char **text, size_t *len);
AC_API ac_stop_reason ac_conversation_stop_reason(const ac_conversation *c);
/* Positions in the conversation's KV cache (0 before the first ac_conversation_say). */
AC_API int ac_conversation_position(const ac_conversation *c);

/* A reply's text as it streams, by the rule above, for a caller that has no conversation
 * (e.g. a server answering a whole list of messages). */
typedef struct ac_chat_reply ac_chat_reply;

AC_API int ac_chat_reply_create(ac_chat_reply **out);
AC_API void ac_chat_reply_free(ac_chat_reply *reply);
/* Takes the reply's next bytes (final != 0: the last); *text / *text_len: the text final now
 * (valid until the next call on reply).  Bytes that may start a character are held back
 * until the next call completes or breaks it. */
AC_API int ac_chat_reply_push(ac_chat_reply *reply, const char *piece, size_t len, int final, const char **text,
                              size_t *text_len);

/* ------------------------------------------------------------------------ knowledge modules */

/* A module is a low-rank adapter for some matrices (wq wk wv wo w1 w2 w3) of some layers of one
 * base model: applied at scale s, W becomes W + s * (alpha / rank) * B A.  It records the base's
 * shape and fingerprint (BLAKE2b-256 of the base model file) and applies to that base only.
 * Applying never changes the base: the result is a new model with its own copy of the weights.
 * The file layout is described in module.c and README "File formats". */
typedef struct ac_module ac_module;

#define AC_FINGERPRINT_BYTES 32
#define AC_MAX_MODULE_RANK 4096
/* Most modules one ac_model_apply_modules call may merge. */
#define AC_MAX_MODULES 64

typedef struct {
    int rank;
    float alpha;
    int n_targets;     /* adapted matrices, over all layers */
    uint64_t n_params; /* floats in A and B, over all targets */
    ac_config base;    /* the base's shape (version, shared_classifier, group_size: 0) */
    unsigned char base_fingerprint[AC_FINGERPRINT_BYTES];
} ac_module_info;

/* A module argument MODULE[:SCALE] as every front end reads it (./run -L, Python's -L and
 * module lists): the scale is what follows the last ':' when that is a finite float32 number
 * written out whole (so a path may hold ':' too), else the whole text is the path and the
 * scale 1.  *path_len receives the path's length in bytes.  AC_ERR_ARG for a NULL argument. */
AC_API int ac_module_spec(const char *spec, size_t *path_len, float *scale);

/* Reads and validates a module file: AC_ERR_FORMAT naming the field for a bad magic, version,
 * rank, alpha, base shape, target table, size, or a non-finite value in A or B. */
AC_API int ac_module_load(const char *path, ac_module **out);
/* Same from memory (the bytes are copied).  name (may be NULL) is used in messages. */
AC_API int ac_module_load_memory(const void *data, size_t size, const char *name, ac_module **out);
AC_API void ac_module_free(ac_module *module);
AC_API int ac_module_get_info(const ac_module *module, ac_module_info *out);
/* The fingerprint modules record: BLAKE2b-256 of the model's file bytes. */
AC_API int ac_model_fingerprint(const ac_model *model, unsigned char out[AC_FINGERPRINT_BYTES]);

/* A new float32 model: base with modules[i] merged at scales[i] (finite; 0 leaves the weights
 * bit for bit as they are), all in one rounding per weight.  n_modules may be 0 (a plain copy).
 * The base and the modules may be freed afterwards.  AC_ERR_MISMATCH when a module was trained
 * on another base (shape or fingerprint; so a model that already has modules merged takes no
 * more: merge them all in one call), AC_ERR_ARG for an int8 base (apply modules, then
 * quantize) or a non-finite scale, AC_ERR_RANGE when a merged weight overflows. */
AC_API int ac_model_apply_modules(const ac_model *base, const ac_module *const *modules,
                                  const float *scales, int n_modules, ac_model **out);

#ifdef __cplusplus
}
#endif

#endif /* ARIANNA_RUN_H */
