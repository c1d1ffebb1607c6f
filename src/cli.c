/*
 * cli.c - the ./run command line: generate text from a model file, or chat with it.
 *
 *   ./run MODEL [options]        (./run -h lists the options with their units and defaults)
 *
 * The text goes to stdout (the prompt, then the continuation), "achieved tok/s: X" (decode:
 * the tokens after the first) and "prompt tok/s: Y" (prefill) to stderr.  Every write to
 * stdout is checked: a full disk, a closed stdout or a reader that went away ends the run with
 * "error: write to stdout failed: ..." and exit 1, never with a speed report.  A bad flag or
 * value is named with the value as typed and the reason (cli_args.c), then the usage goes to
 * stderr and the exit status is 1; load errors print the library's message and exit 1.  The model file is
 * read into private memory, so changing it during a run changes nothing; --mmap maps it instead.
 * Sampling settings are checked by the library (ac_sampler_check_params), and a chat is the
 * library's conversation (ac_conversation_say: template, context shift, the KV cache kept
 * between turns, the answer's text), so ./run, the Python package and the server sample and
 * chat alike.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"

/* ------------------------------------------------------------------------ stdout, checked */

/* errno of the first failed write to stdout; 0 while every write went through.  Once set,
 * the run stops producing text and ends with exit 1 and no speed report. */
static int stdout_error;

static int check_stdout(int ok) {
    if (!ok && !stdout_error) {
        stdout_error = errno ? errno : EIO;
        fprintf(stderr, "error: write to stdout failed: %s\n", strerror(stdout_error));
    }
    return stdout_error ? -1 : 0;
}

/* out_write, out_text and out_flush return 0, or -1 once any write to stdout has failed (the
 * error is printed the first time). */
static int out_write(const char *s, size_t n) {
    if (stdout_error) return -1;
    errno = 0;
    return check_stdout(fwrite(s, 1, n, stdout) == n);
}

static int out_text(const char *s) { return out_write(s, strlen(s)); }

static int out_flush(void) {
    if (stdout_error) return -1;
    errno = 0;
    return check_stdout(fflush(stdout) == 0 && !ferror(stdout));
}

/* The last word on stdout: what is still buffered is written, and closing counts too (some
 * file systems report a full disk only then). */
static int close_stdout(void) {
    if (out_flush()) return -1;
    errno = 0;
    return check_stdout(fclose(stdout) == 0);
}

/* A standard stream closed by the caller (`>&-`) leaves its descriptor free, and the next
 * open() - the model file, or the file -o writes - would become "stdout".  Park /dev/null
 * there, read-only, so that writes still fail (EBADF) as on the closed descriptor. */
static void keep_standard_descriptors(void) {
    for (int fd = 0; fd <= 2; fd++)
        if (fcntl(fd, F_GETFD) == -1 && errno == EBADF) (void)open("/dev/null", O_RDONLY);
}

/* ------------------------------------------------------------------------ session settings */

/* The settings of a session or batch: the options given, the library's defaults otherwise. */
static ac_session_params session_params(const options *o, int steps) {
    ac_session_params p = ac_session_default_params();
    p.sampler = o->sampling;
    p.max_new_tokens = steps;
    p.n_threads = o->threads;
    p.ignore_eos = o->ignore_eos;
    return p;
}

/* The byte lengths of the --stop strings. */
static void stop_lengths(const options *o, size_t *lens) {
    for (int i = 0; i < o->n_stops; i++) lens[i] = strlen(o->stop[i]);
}

/* A failed ac_session_set_stops / ac_batch_set_stops / ac_conversation_set_stops: the
 * library's message, with the flag. */
static int stops_refused(void) {
    fprintf(stderr, "error: --stop: %s\n", ac_last_error());
    return 1;
}

/* ------------------------------------------------------------------------ generate mode */

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct {
    const ac_session *session;
    const char *prompt;        /* printed with the first piece: by then it is known to fit */
    int shown;                 /* the prompt has been printed */
    int count;                 /* tokens generated */
    int n_prompt;              /* prompt tokens, BOS included */
    double start, first, last; /* times of the start, the first and the latest token */
} progress;

/* The prompt, once: with the first piece, or when the text ended without one. */
static int show_prompt(progress *p) {
    if (p->shown) return 0;
    p->shown = 1;
    return out_text(p->prompt);
}

static int print_piece(void *user, int token, const char *piece, size_t len) {
    progress *p = user;
    /* the prompt is in the cache and the first token is sampled but not yet run */
    if (p->count == 0 && token >= 0) p->n_prompt = ac_session_position(p->session);
    if (show_prompt(p) || out_write(piece, len) || out_flush()) return 1;
    if (token < 0) return 0; /* bytes held back for the stop strings, at the end */
    p->last = now_seconds();
    if (p->count++ == 0) p->first = p->last;
    return 0;
}

static void report_speed(const progress *p) {
    /* the first token's time includes the prompt, so the rate counts the tokens after it */
    if (p->count > 1 && p->last > p->first)
        fprintf(stderr, "achieved tok/s: %f\n", (p->count - 1) / (p->last - p->first));
    /* prefill (+ sampling the first token) */
    if (p->count > 0 && p->first > p->start)
        fprintf(stderr, "prompt tok/s: %f\n", p->n_prompt / (p->first - p->start));
}

static int generate(ac_session *s, const options *o) {
    size_t lens[AC_MAX_STOPS];
    stop_lengths(o, lens);
    if (o->n_stops && ac_session_set_stops(s, o->stop, lens, o->n_stops)) return stops_refused();
    progress p = {s, o->prompt ? o->prompt : "", 0, 0, 0, 0, 0, 0};
    p.start = now_seconds();
    int rc = ac_generate(s, p.prompt, strlen(p.prompt), print_piece, &p, NULL);
    if (!rc) show_prompt(&p); /* the model ended the text at once */
    if (p.shown) out_text("\n");
    out_flush(); /* the text ends before the speed report on stderr */
    if (rc) {
        fprintf(stderr, "error: %s\n", ac_last_error());
        return 1;
    }
    if (stdout_error) return 1;
    report_speed(&p);
    return 0;
}

/* Prints sequence i of a finished batch: its title, the prompt, then the first text_len bytes
 * of its tokens' pieces (a stop string cut the rest). */
static void print_sequence(const ac_tokenizer *tok, const options *o, const char *prompt, int i,
                           const int *tokens, const ac_batch_result *r) {
    char title[96];
    if (o->sampling.seed == AC_SEED_RANDOM)
        snprintf(title, sizeof title, "=== sequence %d (random seed) ===\n", i);
    else
        snprintf(title, sizeof title, "=== sequence %d (seed %llu) ===\n", i,
                 (unsigned long long)(o->sampling.seed + (uint64_t)i));
    out_text(title);
    out_text(prompt);
    size_t left = r->text_len;
    int prev = r->last_prompt_token;
    for (int k = 0; k < r->n_generated && left > 0; k++) {
        const char *piece;
        size_t len;
        if (ac_decode_piece(tok, prev, tokens[k], &piece, &len) == AC_OK) {
            len = len < left ? len : left;
            out_write(piece, len);
            left -= len;
        }
        prev = tokens[k];
    }
    out_text("\n");
}

/* -b N: N sequences of the same prompt advanced together, seeds s, s+1, ...; each is printed
 * in turn after all have finished, and the rate is the total over all of them (the time
 * includes the prompts' prefill). */
static int generate_batch(const ac_model *model, const ac_tokenizer *tok, const options *o,
                          int steps) {
    const char *prompt = o->prompt ? o->prompt : "";
    int n = o->batch;
    size_t len = strlen(prompt);
    /* steps tokens per sequence: at least the library's ac_batch_max_tokens */
    int *tokens = malloc((size_t)n * (size_t)steps * sizeof *tokens);
    ac_batch_result *results = malloc((size_t)n * sizeof *results);
    const char **prompts = malloc((size_t)n * sizeof *prompts);
    size_t *lens = malloc((size_t)n * sizeof *lens);
    size_t stop_lens[AC_MAX_STOPS];
    stop_lengths(o, stop_lens);
    ac_batch *b = NULL;
    int rc = AC_OK;
    ac_session_params params = session_params(o, steps);
    if (!tokens || !results || !prompts || !lens) {
        fprintf(stderr, "error: out of memory for the tokens of %d sequences of up to %d tokens "
                "(%.1f MiB)\n", n, steps, (double)n * steps * sizeof *tokens / (1 << 20));
        rc = AC_ERR_NOMEM;
    } else if ((rc = ac_batch_create(model, tok, n, &params, &b))) {
        fprintf(stderr, "error: %s\n", ac_last_error());
    } else if (o->n_stops && (rc = ac_batch_set_stops(b, o->stop, stop_lens, o->n_stops))) {
        stops_refused();
    }
    double start = now_seconds(), end = start;
    if (!rc) {
        for (int i = 0; i < n; i++) {
            prompts[i] = prompt;
            lens[i] = len;
        }
        rc = ac_batch_generate(b, prompts, lens, tokens, results);
        end = now_seconds();
        if (rc) fprintf(stderr, "error: %s\n", ac_last_error());
    }
    long long total = 0;
    for (int i = 0; !rc && !stdout_error && i < n; i++) {
        print_sequence(tok, o, prompt, i, tokens + (size_t)i * (size_t)ac_batch_max_tokens(b), &results[i]);
        total += results[i].n_generated;
    }
    out_flush();
    if (!rc && !stdout_error && total > 0 && end > start)
        fprintf(stderr, "achieved tok/s: %f (total of %d sequences)\n", total / (end - start), n);
    ac_batch_free(b);
    free(tokens);
    free(results);
    free(prompts);
    free(lens);
    return rc || stdout_error ? 1 : 0;
}

/* ------------------------------------------------------------------------ chat mode */

/* Asks question on stdout and reads one line of stdin, of any length, without its newline,
 * into *line (grown as needed).  Returns 1, 0 at the end of input, -1 on an error (printed). */
static int read_line(const char *question, char **line, size_t *cap) {
    if (out_text(question) || out_flush()) return -1;
    errno = 0;
    ssize_t n = getline(line, cap, stdin);
    if (n < 0 && errno == ENOMEM) {
        fprintf(stderr, "error: out of memory for a line of stdin\n");
        return -1;
    }
    if (n < 0 && ferror(stdin)) {
        fprintf(stderr, "error: read from stdin failed: %s\n", strerror(errno));
        return -1;
    }
    if (n < 0) { /* the end of input: an empty line (getline may have left the buffer unset) */
        if (*line) (*line)[0] = '\0';
        return 0;
    }
    if (n > 0 && (*line)[n - 1] == '\n') (*line)[n - 1] = '\0';
    return 1;
}

/* Prints the reply to the turn just said, as the library generates and cleans it.  0, or -1
 * on an error (printed). */
static int stream_reply(ac_conversation *c) {
    if (out_text("Assistant: ")) return -1;
    for (int token = 0; token >= 0;) {
        const char *text;
        size_t len;
        if (ac_conversation_next(c, &token, &text, &len)) {
            fprintf(stderr, "error: %s\n", ac_last_error());
            return -1;
        }
        if (out_write(text, len) || out_flush()) return -1;
    }
    return out_text("\n") || out_flush() ? -1 : 0;
}

/* One user turn, answered; or, when even with the older exchanges left out it leaves no room
 * for an answer, refused with its size (said on stdout: the conversation goes on).  Returns
 * 1 when the answer filled the context, 0 otherwise, -1 on an error (printed). */
static int chat_turn(ac_conversation *c, const ac_session_params *params, const char *user, int seq_len) {
    ac_conversation_turn turn;
    int rc = ac_conversation_say(c, params, user, strlen(user), &turn);
    if (rc == AC_ERR_RANGE) {
        char note[256];
        snprintf(note, sizeof note, "(this turn is too long: with it the conversation is %d tokens, and the "
                 "context holds %d (one left for the answer); the conversation goes on)\n", turn.n_conversation,
                 seq_len - 1);
        return out_text(note) || out_flush() ? -1 : 0;
    }
    if (rc) {
        fprintf(stderr, "error: %s\n", ac_last_error());
        return -1;
    }
    if (stream_reply(c)) return -1;
    return ac_conversation_stop_reason(c) == AC_STOP_CONTEXT;
}

/* The chat loop: each line of stdin is a user turn, said to the library's conversation (the
 * template, the context shift, the KV cache kept between turns, the answer's text are its);
 * an answer that fills the context ends the chat. */
static int chat(const ac_model *model, const ac_tokenizer *tok, const ac_session_params *params, const options *o,
                int seq_len) {
    ac_conversation *c = NULL;
    size_t stop_lens[AC_MAX_STOPS];
    stop_lengths(o, stop_lens);
    if (ac_conversation_create(model, tok, o->chat_template, &c)) {
        fprintf(stderr, "error: %s\n", ac_last_error());
        return 1;
    }
    if (ac_conversation_set_stops(c, o->stop, stop_lens, o->n_stops)) {
        ac_conversation_free(c);
        return stops_refused();
    }
    char *system = NULL, *line = NULL;
    size_t system_cap = 0, line_cap = 0;
    int status = 0, context_full = 0;
    if (!o->system && read_line("Enter system prompt (optional): ", &system, &system_cap) < 0) status = 1;
    const char *system_prompt = o->system ? o->system : system;
    if (!status && system_prompt && system_prompt[0] &&
        ac_conversation_add(c, "system", system_prompt, strlen(system_prompt))) {
        fprintf(stderr, "error: %s\n", ac_last_error());
        status = 1;
    }
    for (int turn = 0; !status && !context_full; turn++) {
        const char *user = o->prompt; /* -i is the first turn */
        if (turn > 0 || !o->prompt) {
            int r = read_line("User: ", &line, &line_cap);
            if (r <= 0) {
                status = r < 0;
                break;
            }
            user = line;
        }
        int r = chat_turn(c, params, user, seq_len);
        status = r < 0;
        context_full = r > 0;
    }
    if (context_full && !status) status = out_text("(the context is full)\n") ? 1 : 0;
    ac_conversation_free(c);
    free(system);
    free(line);
    return status;
}

/* ------------------------------------------------------------------------ main */

/* -L: a new model, base with every module merged (the base file is only read); frees base. */
static ac_model *with_modules(ac_model *base, const options *o) {
    ac_module *modules[AC_MAX_MODULES];
    ac_model *merged = NULL;
    int n = 0, rc = 0;
    while (!rc && n < o->n_modules) {
        char *path = strndup(o->module[n], o->module_path_len[n]);
        rc = path ? ac_module_load(path, &modules[n]) : AC_ERR_NOMEM;
        if (!path) fprintf(stderr, "error: out of memory for the path of module %s\n", o->module[n]);
        else if (rc) fprintf(stderr, "error: %s\n", ac_last_error());
        free(path);
        if (!rc) n++;
    }
    if (!rc && ac_model_apply_modules(base, (const ac_module *const *)modules, o->module_scale, n, &merged))
        fprintf(stderr, "error: %s\n", ac_last_error());
    for (int i = 0; i < n; i++) ac_module_free(modules[i]);
    ac_model_free(base);
    return merged;
}

/* Loads the model and merges -L modules; -q int8 quantizes a float32 one (an int8 file is
 * used as it is). */
static ac_model *load_model(const options *o) {
    ac_model *model = NULL, *quantized = NULL;
    ac_model_load_params params = ac_model_default_load_params();
    params.use_mmap = o->use_mmap;
    if (ac_model_load_file(o->model_path, &params, &model)) {
        fprintf(stderr, "error: %s\n", ac_last_error());
        return NULL;
    }
    if (o->n_modules && !(model = with_modules(model, o))) return NULL;
    ac_config cfg;
    ac_model_config(model, &cfg);
    if (!o->int8 || cfg.group_size) return model;
    int rc = ac_model_quantize(model, 0, &quantized);
    ac_model_free(model);
    if (rc) fprintf(stderr, "error: %s: %s\n", o->model_path, ac_last_error());
    return quantized;
}

static ac_tokenizer *load_tokenizer(const options *o, int vocab_size) {
    char path[PATH_MAX + 16];
    ac_tokenizer *tok = NULL;
    if (ac_tokenizer_path(o->model_path, o->tokenizer, path, sizeof path) ||
        ac_tokenizer_load(path, vocab_size, &tok))
        fprintf(stderr, "error: %s\n", ac_last_error());
    return tok;
}

/* Generate with one session or -b sequences together, or chat.  Returns the exit status. */
static int run_model(const ac_model *model, const ac_tokenizer *tok, const options *o, int steps, int seq_len) {
    if (o->batch > 1) return generate_batch(model, tok, o, steps);
    ac_session_params params = session_params(o, steps);
    if (!strcmp(o->mode, "chat")) return chat(model, tok, &params, o, seq_len);
    ac_session *session = NULL;
    int status = 1;
    if (ac_session_create(model, tok, &params, &session)) fprintf(stderr, "error: %s\n", ac_last_error());
    else status = generate(session, o);
    ac_session_free(session);
    return status;
}

int main(int argc, char **argv) {
    keep_standard_descriptors();
    options o;
    switch (parse_args(argc, argv, &o)) {
    case ARGS_HELP:
        usage(stdout);
        return close_stdout() ? 1 : 0;
    case ARGS_VERSION:
        out_text("arianna_c ");
        out_text(ac_version());
        out_text("\n");
        return close_stdout() ? 1 : 0;
    case ARGS_BAD:
        usage(stderr);
        return 1;
    }

    ac_model *model = load_model(&o);
    if (!model) return 1;
    if (o.out_path) {
        int rc = ac_model_save(model, o.out_path);
        if (rc) fprintf(stderr, "error: %s\n", ac_last_error());
        else fprintf(stderr, "wrote %s\n", o.out_path);
        ac_model_free(model);
        return rc ? 1 : 0;
    }
    ac_config cfg;
    ac_model_config(model, &cfg);
    ac_tokenizer *tok = load_tokenizer(&o, cfg.vocab_size);
    int status = 1;
    if (tok) {
        int steps = (o.steps == 0 || o.steps > cfg.seq_len) ? cfg.seq_len : o.steps;
        status = run_model(model, tok, &o, steps, cfg.seq_len);
    }
    ac_tokenizer_free(tok);
    ac_model_free(model);
    if (close_stdout()) status = 1;
    return status;
}
