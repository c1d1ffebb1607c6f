/*
 * chat.c - chat templates as data, and how a conversation becomes what a model continues.
 *
 * A template is a few format strings, one per kind of message, plus the text that opens the
 * assistant's reply and the strings that end one.  "{content}" in a format is where the
 * message goes; "<s>" and "</s>" in a format (never in a message: a user typing "</s>" gets
 * those characters) are the BOS and EOS tokens.  Rendering yields the prompt as parts: special
 * tokens, and the text between them, each text part to be encoded on its own (with
 * SentencePiece's dummy prefix after a special token, as llama.cpp tokenizes such prompts).
 * The CLI, the Python package and the server all read this one table.
 */
#include "internal.h"

#include <stdlib.h>

/* The templates, the default first. */
static const ac_chat_template TEMPLATES[] = {
    /* Q:/A: lines in one paragraph: the form the persona's dialogue module is trained on, and
     * the default for a vocabulary without chat pieces */
    {"qa", "{content}\n", "Q: {content}\n", "A: {content}\n", "A:", NULL, NULL, {"\nQ:"}},
    /* Llama 2: [INST] turns, the system prompt inside the first one's <<SYS>> block, each
     * exchange between BOS and EOS */
    {"llama-2", "<<SYS>>\n{content}\n<</SYS>>\n\n", "<s>[INST] {content} [/INST]", " {content} </s>", "",
     "<s>[INST] {system}{content} [/INST]", NULL, {"[INST]"}},
    /* ChatML, the default when the vocabulary has an <|im_start|> piece */
    {"chatml", "<|im_start|>system\n{content}<|im_end|>\n", "<|im_start|>user\n{content}<|im_end|>\n",
     "<|im_start|>assistant\n{content}<|im_end|>\n", "<|im_start|>assistant\n", NULL, "<|im_start|>",
     {"<|im_end|>", "<|im_start|>"}},
};
enum { N_TEMPLATES = sizeof TEMPLATES / sizeof TEMPLATES[0] };

/* ------------------------------------------------------------------------ the table */

AC_API int ac_chat_template_count(void) { return N_TEMPLATES; }

AC_API const ac_chat_template *ac_chat_template_at(int i) {
    return i >= 0 && i < N_TEMPLATES ? &TEMPLATES[i] : NULL;
}

AC_API const ac_chat_template *ac_chat_template_get(const char *name) {
    for (int i = 0; name && i < N_TEMPLATES; i++)
        if (!strcmp(TEMPLATES[i].name, name)) return &TEMPLATES[i];
    ac_fail(AC_ERR_ARG, "unknown chat template '%s'; known:", name ? name : "(null)");
    for (int i = 0; i < N_TEMPLATES; i++) {
        ac_append_error(i ? ", " : " ");
        ac_append_error(TEMPLATES[i].name);
    }
    return NULL;
}

/* The choice from a vocabulary, in one place: the first template whose marker piece the
 * vocabulary holds, else the default.  has(vocab, marker) says whether it holds one. */
typedef int (*holds_piece_fn)(const void *vocab, const char *marker);

static const ac_chat_template *suggest(holds_piece_fn has, const void *vocab) {
    for (int i = 0; i < N_TEMPLATES; i++)
        if (TEMPLATES[i].marker && has(vocab, TEMPLATES[i].marker)) return &TEMPLATES[i];
    return &TEMPLATES[0];
}

static int same_piece(const char *piece, size_t len, const char *marker) {
    return piece && len == strlen(marker) && !memcmp(piece, marker, len);
}

typedef struct {
    const char *const *pieces;
    const size_t *lens;
    int n;
} piece_list;

static int list_holds(const void *vocab, const char *marker) {
    const piece_list *v = vocab;
    for (int i = 0; i < v->n; i++)
        if (same_piece(v->pieces[i], v->lens[i], marker)) return 1;
    return 0;
}

static int tokenizer_holds(const void *vocab, const char *marker) {
    const ac_tokenizer *tok = vocab;
    for (int i = 0, n = ac_tokenizer_vocab_size(tok); i < n; i++) {
        const char *piece;
        size_t len;
        float score;
        if (ac_tokenizer_piece(tok, i, &piece, &len, &score) == AC_OK && same_piece(piece, len, marker)) return 1;
    }
    return 0;
}

AC_API const ac_chat_template *ac_chat_template_for_vocab(const char *const *pieces, const size_t *lens, int n) {
    piece_list v = {pieces, lens, pieces && lens && n > 0 ? n : 0};
    return suggest(list_holds, &v);
}

AC_API const ac_chat_template *ac_chat_template_for(const ac_tokenizer *tok) {
    return tok ? suggest(tokenizer_holds, tok) : &TEMPLATES[0];
}

/* ------------------------------------------------------------------------ rendering */

/* Where rendered parts go: text is gathered until a special token (or the end) and then
 * handed over as one part.  The first part decides whether BOS goes in front: it does unless
 * the prompt starts with the template's own <s>. */
typedef struct {
    ac_chat_part_fn on_part;
    void *user;
    char *text;
    size_t len, cap;
    int started;
    int rc; /* the first failure (out of memory, or what on_part returned) */
} emitter;

static void add_text(emitter *e, const char *s, size_t n) {
    if (e->rc || n == 0) return;
    if ((e->rc = ac_grow((void **)&e->text, &e->cap, e->len + n, 1, "a chat prompt in bytes"))) return;
    memcpy(e->text + e->len, s, n);
    e->len += n;
}

static void flush_text(emitter *e) {
    if (!e->rc && e->len) e->rc = e->on_part(e->user, -1, e->text, e->len);
    e->len = 0;
}

static void add_token(emitter *e, int token) {
    flush_text(e);
    if (!e->rc) e->rc = e->on_part(e->user, token, NULL, 0);
}

/* Called before each part of the prompt (a message's content counts, even when empty). */
static void start(emitter *e, int is_bos) {
    if (e->started) return;
    e->started = 1;
    if (!is_bos) add_token(e, AC_TOKEN_BOS);
}

static int starts_with(const char *s, const char *prefix) { return !strncmp(s, prefix, strlen(prefix)); }

/* fmt with "{content}" and "{system}" filled in and its markers turned into tokens; with
 * e->on_part NULL (text_only) markers are dropped and only the text is gathered. */
static void expand(emitter *e, const char *fmt, const char *content, size_t content_len, const char *system,
                   size_t system_len, int text_only) {
    while (*fmt && !e->rc) {
        if (starts_with(fmt, "{content}") || starts_with(fmt, "{system}")) {
            int is_content = fmt[1] == 'c';
            if (!text_only) start(e, 0);
            add_text(e, is_content ? content : system, is_content ? content_len : system_len);
            fmt += is_content ? strlen("{content}") : strlen("{system}");
        } else if (starts_with(fmt, "<s>") || starts_with(fmt, "</s>")) {
            int token = fmt[1] == '/' ? AC_TOKEN_EOS : AC_TOKEN_BOS;
            if (!text_only) {
                start(e, token == AC_TOKEN_BOS);
                add_token(e, token);
            }
            fmt += token == AC_TOKEN_EOS ? strlen("</s>") : strlen("<s>");
        } else {
            size_t n = 1;
            while (fmt[n] && fmt[n] != '{' && fmt[n] != '<') n++;
            if (!text_only) start(e, 0);
            add_text(e, fmt, n);
            fmt += n;
        }
    }
}

enum { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_BAD };

static int role_of(const char *role) {
    if (!role) return ROLE_BAD;
    if (!strcmp(role, "system")) return ROLE_SYSTEM;
    if (!strcmp(role, "user")) return ROLE_USER;
    if (!strcmp(role, "assistant")) return ROLE_ASSISTANT;
    return ROLE_BAD;
}

int ac_chat_check_message(const ac_chat_message *m, int i) {
    int role = role_of(m->role);
    if (role == ROLE_BAD)
        return ac_fail(AC_ERR_ARG, "messages[%d].role '%s' is invalid: it must be one of system, user, assistant", i,
                       m->role ? m->role : "(null)");
    if (role == ROLE_SYSTEM && i != 0)
        return ac_fail(AC_ERR_ARG, "messages[%d] is a system message: only the first message may be one", i);
    if (!m->content && m->content_len) return ac_fail(AC_ERR_ARG, "messages[%d].content is NULL", i);
    return AC_OK;
}

static int check_messages(const ac_chat_message *messages, int n) {
    if (n <= 0 || !messages) return ac_fail(AC_ERR_ARG, "messages is empty: give at least one message");
    for (int i = 0; i < n; i++) {
        int rc = ac_chat_check_message(&messages[i], i);
        if (rc) return rc;
    }
    return AC_OK;
}

/* The system prompt as a template with user_first puts it inside the first user message:
 * the system format's text, markers dropped. */
static void render_system_text(const ac_chat_template *t, const ac_chat_message *m, emitter *text) {
    expand(text, t->system, m->content, m->content_len, NULL, 0, 1);
}

AC_API int ac_chat_render(const ac_chat_template *t, const ac_chat_message *messages, int n,
                          int add_generation_prompt, ac_chat_part_fn on_part, void *user) {
    if (!t || !on_part) return ac_fail(AC_ERR_ARG, "ac_chat_render: template or on_part is NULL");
    int rc = check_messages(messages, n);
    if (rc) return rc;
    emitter e = {on_part, user, NULL, 0, 0, 0, AC_OK};
    emitter system = {NULL, NULL, NULL, 0, 0, 0, AC_OK}; /* a system prompt waiting for user_first */
    int system_waits = 0;
    for (int i = 0; i < n && !e.rc; i++) {
        const ac_chat_message *m = &messages[i];
        switch (role_of(m->role)) {
        case ROLE_SYSTEM:
            if (t->user_first) {
                render_system_text(t, m, &system);
                system_waits = 1;
            } else {
                expand(&e, t->system, m->content, m->content_len, NULL, 0, 0);
            }
            break;
        case ROLE_USER:
            expand(&e, system_waits ? t->user_first : t->user, m->content, m->content_len, system.text,
                   system.len, 0);
            system_waits = 0;
            break;
        default:
            expand(&e, t->assistant, m->content, m->content_len, NULL, 0, 0);
        }
    }
    if (system_waits) expand(&e, t->system, messages[0].content, messages[0].content_len, NULL, 0, 0);
    if (add_generation_prompt) expand(&e, t->generation, NULL, 0, NULL, 0, 0);
    start(&e, 0); /* nothing at all was rendered: the prompt is BOS */
    flush_text(&e);
    rc = system.rc ? system.rc : e.rc;
    free(e.text);
    free(system.text);
    return rc;
}

/* ------------------------------------------------------------------------ tokens */

typedef struct {
    const ac_tokenizer *tok;
    int *tokens;
    int cap;
    int n; /* tokens the prompt has so far (may exceed cap: then only counted) */
} token_sink;

static int add_part_tokens(void *user, int token, const char *text, size_t len) {
    token_sink *s = user;
    if (token >= 0) {
        if (s->n < s->cap) s->tokens[s->n] = token;
        s->n++;
        return AC_OK;
    }
    int room = s->n < s->cap ? s->cap - s->n : 0, got = -1;
    int rc = ac_encode(s->tok, text, len, 0, 0, room ? s->tokens + s->n : NULL, room, &got);
    /* AC_ERR_RANGE with a count: the tokens did not fit, and are counted; without one (a
     * text too long to encode) it is an error like any other */
    if (rc && !(rc == AC_ERR_RANGE && got >= 0)) return rc;
    s->n += got;
    return AC_OK;
}

AC_API int ac_chat_tokens(const ac_chat_template *t, const ac_tokenizer *tok, const ac_chat_message *messages,
                          int n, int add_generation_prompt, int *tokens, int max_tokens, int *n_tokens) {
    if (!tok || !n_tokens || max_tokens < 0 || (max_tokens > 0 && !tokens))
        return ac_fail(AC_ERR_ARG, "ac_chat_tokens: bad arguments");
    token_sink s = {tok, tokens, max_tokens, 0};
    int rc = ac_chat_render(t, messages, n, add_generation_prompt, add_part_tokens, &s);
    if (rc) return rc;
    *n_tokens = s.n;
    if (s.n > max_tokens)
        return ac_fail(AC_ERR_RANGE, "the chat prompt is %d tokens but the buffer holds %d", s.n, max_tokens);
    return AC_OK;
}
