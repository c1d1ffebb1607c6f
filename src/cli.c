/*
 * cli.c - the ./run command line: generate text from a model file, or chat with it.
 *
 *   ./run MODEL [options]        (./run -h lists the options with their units and defaults)
 *
 * The text goes to stdout (the prompt, then the continuation), "achieved tok/s: X" (decode:
 * the tokens after the first) and "prompt tok/s: Y" (prefill) to stderr.  Every write to
 * stdout is checked: a full disk, a closed stdout or a reader that went away ends the run with
 * "error: write to stdout failed: ..." and exit 1, never with a speed report.  A bad flag or
 * value is named with the value as typed and the reason, then the usage goes to stderr and the
 * exit status is 1; load errors print the library's message and exit 1.  The model file is
 * read into private memory, so changing it during a run changes nothing; --mmap maps it instead.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "run.h"

#define STRINGIFY(x) STRINGIFY_(x)
#define STRINGIFY_(x) #x

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

/* ------------------------------------------------------------------------ usage */

static void usage(FILE *f) {
    ac_session_params d = ac_session_default_params();
    fprintf(f,
            "Usage:   run <model.bin> [options]\n"
            "         run -h | --help | --version\n"
            "Example: run persona/arianna_v1_base.bin -z tok4096 -n 256 -i \"Resonance is\"\n"
            "Options (each -x takes a value):\n"
            "  -t <float>  temperature, >= 0 (0 = greedy); default %g\n"
            "  -p <float>  top-p (nucleus) in (0, 1] (1 = off); default %g\n"
            "  -k <int>    top-k: sample among the k likeliest tokens, >= 0 (0 = off); default %d\n"
            "  -s <int>    random seed, 0..18446744073709551614; default: a random one (also 0)\n"
            "  -n <int>    tokens to generate (per answer in chat), >= 0 (0 = up to seq_len);\n"
            "              default %d; prompt plus generated tokens never exceed seq_len\n"
            "  -i <string> prompt (in chat: the first user turn); default: empty (from BOS)\n"
            "  -z <string> tokenizer file: NAME, NAME.bin, then both in the model's folder;\n"
            "              default: tokenizer.bin, then tok4096.bin in the model's folder\n"
            "  -m <string> mode: generate or chat (a [INST] loop on stdin); default generate\n"
            "  -y <string> chat: system prompt; default: asked on stdin\n"
            "  -T <int>    threads, 1..%d; default: all available cores (%d here)\n"
            "  -q <string> int8: quantize a float32 model at load (an int8 file is used as it is)\n"
            "  -o <string> write the model (quantized with -q int8) to this file and exit\n"
            "  -L <string> knowledge module MODULE[:SCALE] merged into the weights at load, before\n"
            "              -q; repeatable (up to %d); SCALE default 1, 0 = the base exactly\n"
            "  -b <int>    generate: sequences advanced together (seeds s, s+1, ...), 1..%d, each\n"
            "              printed in turn, the total tok/s reported; default 1\n"
            "  -e <int>    generate: 1 = do not stop when the model ends the text (BOS/EOS):\n"
            "              always -n tokens (up to seq_len), e.g. for timing; default 0\n"
            "  --mmap      map the model file instead of reading it into memory (default: read);\n"
            "              the file must then not be changed or truncated until the run ends\n"
            "The text goes to stdout; tok/s (tokens per second) and errors go to stderr.\n",
            (double)d.sampler.temperature, (double)d.sampler.top_p, d.sampler.top_k, d.max_new_tokens, AC_MAX_THREADS,
            ac_default_threads(), AC_MAX_MODULES, AC_MAX_BATCH);
}

/* ------------------------------------------------------------------------ argument parsing */

/* The number parsers take the whole string (no blanks, nothing after the number) and return
 * NULL with the value stored, or the reason the string is not such a number. */

/* A float, checked as the double the user wrote (so 1.0000001 is not rounded to 1 first). */
static const char *parse_float(const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || isspace((unsigned char)s[0]) || isnan(v)) return "not a number";
    if (isinf(v) && errno != ERANGE) return "not a finite number"; /* "inf" as typed */
    if (fabs(v) > FLT_MAX) return "too large for a float (the largest is 3.4e+38)";
    if ((v != 0.0 && fabs(v) < FLT_MIN) || errno == ERANGE)
        return "too close to 0 for a float (the smallest is 1.2e-38)";
    *out = v;
    return NULL;
}

static const char *parse_int(const char *s, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || isspace((unsigned char)s[0])) return "not a whole number";
    if ((errno == ERANGE && v > 0) || v > INT_MAX) return "too large (the largest is 2147483647)";
    if (errno == ERANGE || v < INT_MIN) return "too small (the smallest is -2147483648)";
    *out = (int)v;
    return NULL;
}

static const char *parse_u64(const char *s, unsigned long long *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s || *end || isspace((unsigned char)s[0])) return "not a whole number";
    if (s[0] == '-') return "the seed must be >= 0";
    if (errno == ERANGE) return "too large (the largest is 18446744073709551615)";
    *out = v;
    return NULL;
}

typedef struct {
    const char *model_path;
    const char *tokenizer; /* -z, or NULL */
    const char *prompt;    /* -i, or NULL */
    const char *system;    /* -y, or NULL */
    const char *mode;
    const char *out_path;  /* -o, or NULL */
    ac_sampler_params sampling;
    int steps;
    int threads;           /* 0: the library's default */
    int int8;              /* -q int8 */
    int batch;
    int ignore_eos;        /* -e 1 */
    int use_mmap;          /* --mmap */
    const char *module[AC_MAX_MODULES]; /* -L MODULE[:SCALE] as typed */
    size_t module_path_len[AC_MAX_MODULES];
    float module_scale[AC_MAX_MODULES];
    int n_modules;
} options;

enum { ARGS_RUN, ARGS_HELP, ARGS_VERSION, ARGS_BAD };

/* The option letters: each is a case of parse_flag, and each takes a value. */
#define FLAGS "tpksnizymTqobeL"

/* -L MODULE[:SCALE]: the scale is what follows the last ':' when that is a number (so a path
 * may hold ':' too), else 1. */
static const char *parse_module(const char *val, options *o) {
    if (o->n_modules == AC_MAX_MODULES) return "too many modules (the most is " STRINGIFY(AC_MAX_MODULES) ")";
    double scale = 1.0;
    const char *colon = strrchr(val, ':');
    size_t len = strlen(val);
    if (colon && colon > val && !parse_float(colon + 1, &scale)) len = (size_t)(colon - val);
    o->module[o->n_modules] = val;
    o->module_path_len[o->n_modules] = len;
    o->module_scale[o->n_modules++] = (float)scale;
    return NULL;
}

/* Checks the value of a flag in FLAGS and stores it; returns NULL, or why it is refused. */
static const char *parse_flag(char flag, const char *val, options *o, unsigned long long *seed) {
    const char *why = NULL;
    double x = 0;
    switch (flag) {
    case 't':
        if (!(why = parse_float(val, &x)) && !(x >= 0)) why = "temperature must be >= 0 (0 = greedy)";
        if (!why) o->sampling.temperature = (float)x;
        return why;
    case 'p':
        if (!(why = parse_float(val, &x)) && !(x > 0 && x <= 1)) why = "top-p must be in (0, 1] (1 = off)";
        if (!why) o->sampling.top_p = (float)x;
        return why;
    case 'k':
        if (!(why = parse_int(val, &o->sampling.top_k)) && o->sampling.top_k < 0)
            why = "top-k must be >= 0 (0 = off)";
        return why;
    case 's': return parse_u64(val, seed);
    case 'n':
        if (!(why = parse_int(val, &o->steps)) && o->steps < 0)
            why = "the number of tokens must be >= 0 (0 = up to seq_len)";
        return why;
    case 'T':
        if (!(why = parse_int(val, &o->threads)) && (o->threads < 1 || o->threads > AC_MAX_THREADS))
            why = "threads must be in 1.." STRINGIFY(AC_MAX_THREADS);
        return why;
    case 'b':
        if (!(why = parse_int(val, &o->batch)) && (o->batch < 1 || o->batch > AC_MAX_BATCH))
            why = "the batch must be in 1.." STRINGIFY(AC_MAX_BATCH) " sequences";
        return why;
    case 'e':
        if (!(why = parse_int(val, &o->ignore_eos)) && o->ignore_eos != 0 && o->ignore_eos != 1)
            why = "must be 0 or 1";
        return why;
    case 'm':
        o->mode = val;
        return strcmp(val, "generate") && strcmp(val, "chat") ? "the mode must be generate or chat" : NULL;
    case 'q':
        o->int8 = !strcmp(val, "int8");
        return o->int8 ? NULL : "the only quantization is int8";
    case 'i': o->prompt = val; return NULL;
    case 'z': o->tokenizer = val; return NULL;
    case 'y': o->system = val; return NULL;
    case 'o': o->out_path = val; return NULL;
    case 'L': return parse_module(val, o);
    }
    return "not an option";
}

static int is_help(const char *arg) { return !strcmp(arg, "-h") || !strcmp(arg, "--help"); }

/* Reads argv into o.  A usage error is printed here, naming what is wrong (the caller adds
 * the usage text). */
static int parse_args(int argc, char **argv, options *o) {
    if (argc >= 2 && is_help(argv[1])) return ARGS_HELP;
    if (argc >= 2 && !strcmp(argv[1], "--version")) return ARGS_VERSION;
    if (argc < 2) {
        fprintf(stderr, "error: no model file given\n");
        return ARGS_BAD;
    }
    if (argv[1][0] == '-') {
        fprintf(stderr, "error: the model file comes first, before %s\n", argv[1]);
        return ARGS_BAD;
    }
    o->model_path = argv[1];
    o->tokenizer = o->prompt = o->system = NULL;
    o->mode = "generate";
    o->sampling = ac_session_default_params().sampler;
    o->steps = ac_session_default_params().max_new_tokens;
    o->out_path = NULL;
    o->threads = 0;
    o->int8 = 0;
    o->batch = 1;
    o->ignore_eos = 0;
    o->use_mmap = 0;
    o->n_modules = 0;
    unsigned long long seed = 0;
    for (int i = 2, step; i < argc; i += step) {
        const char *flag = argv[i];
        step = 2; /* a flag and its value */
        if (is_help(flag)) return ARGS_HELP;
        if (!strcmp(flag, "--version")) return ARGS_VERSION;
        if (!strcmp(flag, "--mmap")) { /* the one option without a value */
            o->use_mmap = 1;
            step = 1;
            continue;
        }
        if (flag[0] != '-') {
            fprintf(stderr, "error: unexpected argument '%s': options come as -x VALUE\n", flag);
            return ARGS_BAD;
        }
        if (strlen(flag) != 2 || !strchr(FLAGS, flag[1])) {
            fprintf(stderr, "error: unknown option %s\n", flag);
            return ARGS_BAD;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "error: %s needs a value\n", flag);
            return ARGS_BAD;
        }
        const char *why = parse_flag(flag[1], argv[i + 1], o, &seed);
        if (why) {
            fprintf(stderr, "error: %s %s: %s\n", flag, argv[i + 1], why);
            return ARGS_BAD;
        }
    }
    if (o->batch > 1 && !strcmp(o->mode, "chat")) {
        fprintf(stderr, "error: -b applies to generate mode only\n");
        return ARGS_BAD;
    }
    /* seed 0 means "not chosen": the library's default, a fresh random seed */
    if (seed) o->sampling.seed = seed;
    return ARGS_RUN;
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

/* ------------------------------------------------------------------------ generate mode */

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct {
    const ac_session *session;
    const char *prompt;        /* printed with the first token: by then it is known to fit */
    int count;
    int n_prompt;              /* prompt tokens, BOS included */
    double start, first, last; /* times of the start, the first and the latest token */
} progress;

static int print_piece(void *user, int token, const char *piece, size_t len) {
    (void)token;
    progress *p = user;
    if (p->count == 0) {
        /* the prompt is in the cache and the first token is sampled but not yet run */
        p->n_prompt = ac_session_position(p->session);
        if (out_text(p->prompt)) return 1;
    }
    if (out_write(piece, len) || out_flush()) return 1;
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

static int generate(ac_session *s, const options *o, int steps) {
    progress p = {s, o->prompt ? o->prompt : "", 0, 0, 0, 0, 0};
    p.start = now_seconds();
    (void)steps; /* the session's max_new_tokens */
    int rc = ac_generate(s, p.prompt, strlen(p.prompt), print_piece, &p, NULL);
    if (!rc && p.count == 0) out_text(p.prompt); /* the model ended the text at once */
    if (!rc || p.count > 0) out_text("\n");
    out_flush(); /* the text ends before the speed report on stderr */
    if (rc) {
        fprintf(stderr, "error: %s\n", ac_last_error());
        return 1;
    }
    if (stdout_error) return 1;
    report_speed(&p);
    return 0;
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
    ac_batch *b = NULL;
    int rc = AC_OK;
    ac_session_params params = session_params(o, steps);
    if (!tokens || !results || !prompts || !lens) {
        fprintf(stderr, "error: out of memory for the tokens of %d sequences of up to %d tokens "
                "(%.1f MiB)\n", n, steps, (double)n * steps * sizeof *tokens / (1 << 20));
        rc = AC_ERR_NOMEM;
    } else if ((rc = ac_batch_create(model, tok, n, &params, &b))) {
        fprintf(stderr, "error: %s\n", ac_last_error());
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
        char title[96];
        if (o->sampling.seed == AC_SEED_RANDOM)
            snprintf(title, sizeof title, "=== sequence %d (random seed) ===\n", i);
        else
            snprintf(title, sizeof title, "=== sequence %d (seed %llu) ===\n", i,
                     (unsigned long long)(o->sampling.seed + (uint64_t)i));
        out_text(title);
        out_text(prompt);
        int prev = results[i].last_prompt_token, stride = ac_batch_max_tokens(b);
        for (int k = 0; k < results[i].n_generated; k++) {
            int token = tokens[(size_t)i * (size_t)stride + (size_t)k];
            const char *piece;
            size_t piece_len;
            if (ac_decode_piece(tok, prev, token, &piece, &piece_len) == AC_OK) out_write(piece, piece_len);
            prev = token;
        }
        out_text("\n");
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
    if (n < 0) return 0;
    if (n > 0 && (*line)[n - 1] == '\n') (*line)[n - 1] = '\0';
    return 1;
}

/* The Llama-2 chat template; the system prompt goes with the first turn.  NULL when out of
 * memory. */
static char *format_turn(const char *system, const char *user) {
    char *turn = NULL;
    int n = system && system[0] ? asprintf(&turn, "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", system, user)
                                : asprintf(&turn, "[INST] %s [/INST]", user);
    return n < 0 ? NULL : turn;
}

/* Feeds one turn and streams the answer until the model emits EOS (or BOS) or steps tokens.
 * Returns 1 when the answer was given, 0 when the turn did not fit in what is left of the
 * context (said on stdout: the conversation goes on), -1 on an error (printed). */
static int chat_turn(ac_session *s, const char *system, const char *user, int steps, int *context_full) {
    char *turn = format_turn(system, user);
    if (!turn) {
        fprintf(stderr, "error: out of memory for a chat turn of %zu bytes\n", strlen(user));
        return -1;
    }
    int rc = ac_session_feed(s, turn, strlen(turn), 1);
    free(turn);
    if (rc == AC_ERR_RANGE) {
        char note[512];
        snprintf(note, sizeof note, "(this turn is too long: %s; the conversation goes on)\n", ac_last_error());
        return out_text(note) || out_flush() ? -1 : 0;
    }
    if (rc) {
        fprintf(stderr, "error: %s\n", ac_last_error());
        return -1;
    }
    if (out_text("Assistant: ")) return -1;
    (void)steps; /* the session's max_new_tokens */
    for (;;) {
        int token;
        const char *piece;
        size_t len;
        if ((rc = ac_session_next(s, &token, &piece, &len))) {
            fprintf(stderr, "error: %s\n", ac_last_error());
            return -1;
        }
        if (token < 0) break; /* the library ended the answer */
        if (out_write(piece, len) || out_flush()) return -1;
    }
    *context_full = ac_session_stop_reason(s) == AC_STOP_CONTEXT;
    return out_text("\n") || out_flush() ? -1 : 1;
}

/* A Llama-2-style [INST] loop: each user turn is fed with BOS, the assistant answers until
 * it emits EOS, and the KV cache carries the whole conversation until seq_len is used up.
 * A turn that does not fit is refused with its size and the conversation goes on. */
static int chat(ac_session *s, const options *o, int steps) {
    char *system = NULL, *line = NULL;
    size_t system_cap = 0, line_cap = 0;
    int status = 0, system_sent = 0, context_full = 0;
    if (!o->system) {
        int r = read_line("Enter system prompt (optional): ", &system, &system_cap);
        if (r < 0) status = 1;
    }
    const char *system_prompt = o->system ? o->system : system;
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
        int r = chat_turn(s, system_sent ? NULL : system_prompt, user, steps, &context_full);
        if (r < 0) status = 1;
        if (r > 0) system_sent = 1;
    }
    if (context_full && !status) status = out_text("(the context is full)\n") ? 1 : 0;
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

/* Generate or chat with one session, or -b sequences together.  Returns the exit status. */
static int run_model(const ac_model *model, const ac_tokenizer *tok, const options *o, int steps) {
    if (o->batch > 1) return generate_batch(model, tok, o, steps);
    ac_session *session = NULL;
    int status;
    ac_session_params params = session_params(o, steps);
    if (ac_session_create(model, tok, &params, &session)) {
        fprintf(stderr, "error: %s\n", ac_last_error());
        status = 1;
    } else {
        status = strcmp(o->mode, "chat") ? generate(session, o, steps) : chat(session, o, steps);
    }
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
        status = run_model(model, tok, &o, steps);
    }
    ac_tokenizer_free(tok);
    ac_model_free(model);
    if (close_stdout()) status = 1;
    return status;
}
