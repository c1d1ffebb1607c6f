"""The cffi declarations of libarianna's C API (and of its test aids), and the generator of
arianna_c/_ffi.py.

cffi's in-line ABI mode (``FFI().cdef(CDEF)``) parses the declarations with pycparser on every
import, which costs tens of milliseconds of start-up.  Out-of-line ABI mode does that parsing
once, here, and writes the result as the pure Python module ``arianna_c/_ffi.py``, whose
``ffi`` object is built from precomputed type tables without importing cffi or pycparser.

The generated module is committed.  After changing CDEF (or the C API in src/run.h),
regenerate it from the repository root with

    python -m arianna_c._ffi_build

The header records a digest of CDEF and the cffi version that wrote the file:
tests/test_startup.py fails while the digest differs from the current CDEF (whatever cffi is
installed) and, under the recorded cffi version, while the file differs from what it writes.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import cffi
from cffi import FFI

MODULE = "arianna_c._ffi"
TARGET = Path(__file__).resolve().parent / "_ffi.py"
HEADER = ("# Generated from CDEF in arianna_c/_ffi_build.py: `python -m arianna_c._ffi_build`. Do not edit.\n"
          "# CDEF sha256 {digest}, cffi {version}\n")

# Mirrors src/run.h (the part cffi needs; keep the two in step).
CDEF = """
#define AC_ABI_VERSION 3
#define AC_SEED_RANDOM 0xFFFFFFFFFFFFFFFF

enum {
    AC_OK = 0, AC_ERR_IO = 1, AC_ERR_FORMAT = 2, AC_ERR_MISMATCH = 3, AC_ERR_ARG = 4,
    AC_ERR_NOMEM = 5, AC_ERR_RANGE = 6, AC_ERR_NUMERIC = 7
};
enum { AC_TOKEN_UNK = 0, AC_TOKEN_BOS = 1, AC_TOKEN_EOS = 2 };

const char *ac_last_error(void);
const char *ac_strerror(int code);
const char *ac_version(void);
int ac_version_number(void);
int ac_abi_version(void);

typedef struct ac_model ac_model;
typedef struct {
    int dim; int hidden_dim; int n_layers; int n_heads; int n_kv_heads;
    int vocab_size; int seq_len; int shared_classifier; int version; int group_size;
} ac_config;
int ac_model_load(const char *path, ac_model **out);
int ac_model_load_memory(const void *data, size_t size, const char *name, ac_model **out);
void ac_model_free(ac_model *model);
int ac_model_config(const ac_model *model, ac_config *out);
int ac_model_quantize(const ac_model *src, int group_size, ac_model **out);
int ac_model_save(const ac_model *model, const char *path);

#define AC_MAX_MODULES 64
typedef struct ac_module ac_module;
typedef struct {
    int rank; float alpha; int n_targets; uint64_t n_params; ac_config base;
    unsigned char base_fingerprint[32];
} ac_module_info;
int ac_module_spec(const char *spec, size_t *path_len, float *scale);
int ac_module_load(const char *path, ac_module **out);
int ac_module_load_memory(const void *data, size_t size, const char *name, ac_module **out);
void ac_module_free(ac_module *module);
int ac_module_get_info(const ac_module *module, ac_module_info *out);
int ac_model_fingerprint(const ac_model *model, unsigned char out[32]);
int ac_model_apply_modules(const ac_model *base, const ac_module *const *modules, const float *scales,
                           int n_modules, ac_model **out);

const char *ac_kernel_name(void);
int ac_default_threads(void);

typedef struct ac_state ac_state;
int ac_state_create(const ac_model *model, ac_state **out);
void ac_state_free(ac_state *state);
int ac_state_set_threads(ac_state *state, int n_threads);
int ac_forward(ac_state *state, int token, int pos, const float **logits);
int ac_logits(ac_state *state, const int *tokens, int n_tokens, float *out);

typedef struct ac_tokenizer ac_tokenizer;
int ac_tokenizer_load(const char *path, int vocab_size, ac_tokenizer **out);
int ac_tokenizer_load_memory(const void *data, size_t size, int vocab_size, const char *name,
                             ac_tokenizer **out);
void ac_tokenizer_free(ac_tokenizer *tok);
int ac_tokenizer_vocab_size(const ac_tokenizer *tok);
int ac_encode(const ac_tokenizer *tok, const char *text, size_t len, int bos, int eos,
              int *tokens, int max_tokens, int *n_tokens);
int ac_decode_piece(const ac_tokenizer *tok, int prev, int token, const char **piece, size_t *len);
int ac_tokenizer_piece(const ac_tokenizer *tok, int id, const char **piece, size_t *len,
                       float *score);
int ac_tokenizer_path(const char *model_path, const char *name, char *buf, size_t cap);
const char *ac_tokenizer_lookup(void);

#define AC_CHAT_MAX_STOPS 4
typedef struct {
    const char *name; const char *system; const char *user; const char *assistant;
    const char *generation; const char *user_first; const char *marker; const char *stop[4];
} ac_chat_template;
typedef struct { const char *role; const char *content; size_t content_len; } ac_chat_message;
int ac_chat_template_count(void);
const ac_chat_template *ac_chat_template_at(int i);
const ac_chat_template *ac_chat_template_get(const char *name);
const ac_chat_template *ac_chat_template_for_vocab(const char *const *pieces, const size_t *lens, int n);
const ac_chat_template *ac_chat_template_for(const ac_tokenizer *tok);
typedef int (*ac_chat_part_fn)(void *user, int token, const char *text, size_t len);
int ac_chat_render(const ac_chat_template *t, const ac_chat_message *messages, int n,
                   int add_generation_prompt, ac_chat_part_fn on_part, void *user);
int ac_chat_tokens(const ac_chat_template *t, const ac_tokenizer *tok, const ac_chat_message *messages,
                   int n, int add_generation_prompt, int *tokens, int max_tokens, int *n_tokens);

typedef struct ac_sampler ac_sampler;
typedef struct {
    float temperature; float top_p; int top_k; uint64_t seed;
    float min_p; float repeat_penalty; int repeat_last_n; float presence_penalty;
    float frequency_penalty;
} ac_sampler_params;
ac_sampler_params ac_sampler_default_params(void);
int ac_sampler_check_params(const ac_sampler_params *params);
int ac_sampler_create(const ac_sampler_params *params, int vocab_size, ac_sampler **out);
void ac_sampler_free(ac_sampler *sampler);
int ac_sample(ac_sampler *sampler, const float *logits, int *token);
int ac_sampler_accept(ac_sampler *sampler, int token);
void ac_sampler_reset_history(ac_sampler *sampler);
int ac_sampler_set_logit_bias(ac_sampler *sampler, const int *ids, const float *biases, int n);
int ac_logprobs(const float *logits, int n_vocab, int token, int top_n, float *token_logprob,
                int *top_ids, float *top_logprobs);

typedef struct ac_session ac_session;
typedef struct {
    ac_sampler_params sampler; int max_new_tokens; int n_threads; int ignore_eos;
} ac_session_params;
ac_session_params ac_session_default_params(void);
int ac_session_check_params(const ac_session_params *params);
typedef enum {
    AC_STOP_NONE = 0, AC_STOP_END = 1, AC_STOP_LENGTH = 2, AC_STOP_CONTEXT = 3, AC_STOP_CALLER = 4,
    AC_STOP_STRING = 5
} ac_stop_reason;
#define AC_MAX_STOPS 64
#define AC_MAX_STOP_BYTES 4096
typedef struct ac_generation ac_generation;
int ac_generation_create(const ac_model *model, const ac_tokenizer *tok,
                         const ac_session_params *params, ac_generation **out);
void ac_generation_free(ac_generation *gen);
int ac_generation_set_stops(ac_generation *gen, const char *const *stops, const size_t *lens, int n);
int ac_generation_set_logit_bias(ac_generation *gen, const int *ids, const float *biases, int n);
int ac_generation_begin(ac_generation *gen, const int *context, int n_context);
int ac_generation_next(ac_generation *gen, const float *logits, int *token, const char **piece, size_t *len);
void ac_generation_cancel(ac_generation *gen);
ac_stop_reason ac_generation_stop_reason(const ac_generation *gen);
int ac_session_create(const ac_model *model, const ac_tokenizer *tok,
                      const ac_session_params *params, ac_session **out);
void ac_session_free(ac_session *session);
int ac_session_set_params(ac_session *session, const ac_session_params *params);
int ac_session_set_stops(ac_session *session, const char *const *stops, const size_t *lens, int n);
int ac_session_set_logit_bias(ac_session *session, const int *ids, const float *biases, int n);
void ac_session_reset(ac_session *session);
int ac_session_position(const ac_session *session);
int ac_session_feed(ac_session *session, const char *text, size_t len, int bos);
int ac_session_feed_tokens(ac_session *session, const int *tokens, int n_tokens);
int ac_session_next_text(ac_session *session, int max_tokens, const char **text, size_t *len, int *n_generated);
int ac_session_next(ac_session *session, int *token, const char **piece, size_t *len);
ac_stop_reason ac_session_stop_reason(const ac_session *session);

typedef int (*ac_piece_fn)(void *user, int token, const char *piece, size_t len);
int ac_generate(ac_session *session, const char *prompt, size_t len, ac_piece_fn on_piece,
                void *user, int *n_generated);

typedef struct ac_batch ac_batch;
int ac_batch_create(const ac_model *model, const ac_tokenizer *tok, int n_seqs,
                    const ac_session_params *params, ac_batch **out);
void ac_batch_free(ac_batch *batch);
int ac_batch_max_tokens(const ac_batch *batch);
typedef struct {
    int n_generated; int last_prompt_token; ac_stop_reason stop; size_t text_len;
} ac_batch_result;
int ac_batch_generate(ac_batch *batch, const char *const *prompts, const size_t *lens,
                      int *tokens, ac_batch_result *results);
int ac_batch_set_stops(ac_batch *batch, const char *const *stops, const size_t *lens, int n);
int ac_batch_set_logit_bias(ac_batch *batch, const int *ids, const float *biases, int n);
int ac_batch_prefill(ac_batch *batch, int seq, const int *tokens, int n_tokens, int pos,
                     float *logits);
int ac_batch_decode(ac_batch *batch, int n_rows, const int *seqs, const int *tokens,
                    const int *pos, float *logits);

typedef struct ac_conversation ac_conversation;
int ac_conversation_create(const ac_model *model, const ac_tokenizer *tok, const ac_chat_template *t,
                           ac_conversation **out);
void ac_conversation_free(ac_conversation *c);
const ac_chat_template *ac_conversation_template(const ac_conversation *c);
int ac_conversation_add(ac_conversation *c, const char *role, const char *content, size_t len);
int ac_conversation_n_messages(const ac_conversation *c);
const ac_chat_message *ac_conversation_message(const ac_conversation *c, int i);
int ac_conversation_set_stops(ac_conversation *c, const char *const *stops, const size_t *lens, int n);
typedef struct { int n_prompt; int n_conversation; int n_dropped; int n_cached; } ac_conversation_turn;
int ac_conversation_prompt(ac_conversation *c, const ac_session_params *params, const char *user, size_t len,
                           const int **tokens, ac_conversation_turn *turn);
int ac_conversation_reply(ac_conversation *c, const char *piece, size_t len, int final, const char **text,
                          size_t *text_len);
int ac_conversation_say(ac_conversation *c, const ac_session_params *params, const char *user, size_t len,
                        ac_conversation_turn *turn);
int ac_conversation_next(ac_conversation *c, int *token, const char **text, size_t *len);
ac_stop_reason ac_conversation_stop_reason(const ac_conversation *c);
int ac_conversation_position(const ac_conversation *c);
typedef struct ac_chat_reply ac_chat_reply;
int ac_chat_reply_create(ac_chat_reply **out);
void ac_chat_reply_free(ac_chat_reply *reply);
int ac_chat_reply_push(ac_chat_reply *reply, const char *piece, size_t len, int final, const char **text,
                       size_t *text_len);
"""

# Mirrors src/testing.h: what the library exports for the test suite only (comparing two
# code paths).  Not part of the API; nothing in the package calls these.
TESTING_CDEF = """
int ac_logits_stepwise(ac_state *state, const int *tokens, int n_tokens, float *out);
"""


def python_source() -> str:
    """The text of arianna_c/_ffi.py for the current CDEF (cffi writes it to a file only)."""
    builder = FFI()
    builder.cdef(CDEF + TESTING_CDEF)
    builder.set_source(MODULE, None, compiler_verbose=False)  # None: ABI mode, no C compiler
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "_ffi.py"
        builder.emit_python_code(str(out))
        return header() + out.read_text()


def cdef_digest() -> str:
    return hashlib.sha256((CDEF + TESTING_CDEF).encode()).hexdigest()


def header() -> str:
    return HEADER.format(digest=cdef_digest(), version=cffi.__version__)


def recorded(source: str) -> tuple[str, str]:
    """(CDEF digest, cffi version) from the header of a generated module's text."""
    words = source.splitlines()[1].split()
    return words[3].rstrip(","), words[5]


def main() -> None:
    """Writes arianna_c/_ffi.py (LF line endings on every platform, so it stays byte-stable)."""
    TARGET.write_bytes(python_source().encode())
    print(f"wrote {TARGET}", file=sys.stderr)


if __name__ == "__main__":
    main()
