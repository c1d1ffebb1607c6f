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
 * Sampling settings are checked by the library (ac_sampler_check_params), and chat turns are
 * rendered by the library's chat templates (ac_chat_tokens), so ./run, the Python package and
 * the server sample and chat alike.
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
            "Options (each takes a value unless said otherwise):\n"
            "  -t <float>  temperature (also --temp), >= 0 (0 = greedy); default %g\n"
            "  -p <float>  top-p (nucleus, also --top-p) in (0, 1] (1 = off); default %g\n"
            "  -k <int>    top-k (also --top-k): sample among the k likeliest tokens, >= 0\n"
            "              (0 = off); default %d\n"
            "  -s <int>    random seed (also --seed), 0..18446744073709551614; default: a random\n"
            "              one (also 0); in chat every answer starts again from it\n"
            "  -n <int>    tokens to generate (per answer in chat), >= 0 (0 = up to seq_len);\n"
            "              default %d; prompt plus generated tokens never exceed seq_len\n"
            "  -i <string> prompt (in chat: the first user turn); default: empty (from BOS)\n"
            "  -z <string> tokenizer file: NAME, NAME.bin, then both in the model's folder;\n"
            "              default: tokenizer.bin, then tok4096.bin in the model's folder\n"
            "  -m <string> mode: generate or chat (turns read from stdin); default generate\n"
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
            "  --min-p <float>             keep the tokens at least this fraction as likely as\n"
            "                              the likeliest, in [0, 1] (0 = off); default %g\n"
            "  --repeat-penalty <float>    divide the logit of a token seen in the last\n"
            "                              --repeat-last-n tokens by this (multiply when\n"
            "                              negative), >= 0 (1 = off); default %g\n"
            "  --repeat-last-n <int>       the window of recent tokens (prompt included) the\n"
            "                              penalties look at, >= 0 (0 = none); default %d\n"
            "  --presence-penalty <float>  subtracted once from the logit of every token in\n"
            "                              the window (0 = off); default %g\n"
            "  --frequency-penalty <float> subtracted from a token's logit per time it is in\n"
            "                              the window (0 = off); default %g\n"
            "  --stop <string>             end the text before this string, never printing a\n"
            "                              part of it; repeatable (up to %d); default: none\n"
            "  --chat-template <string>    chat: the template of the turns:",
            (double)d.sampler.temperature, (double)d.sampler.top_p, d.sampler.top_k, d.max_new_tokens, AC_MAX_THREADS,
            ac_default_threads(), AC_MAX_MODULES, AC_MAX_BATCH, (double)d.sampler.min_p,
            (double)d.sampler.repeat_penalty, d.sampler.repeat_last_n, (double)d.sampler.presence_penalty,
            (double)d.sampler.frequency_penalty, AC_MAX_STOPS);
    for (int i = 0; i < ac_chat_template_count(); i++)
        fprintf(f, "%s%s", i ? ", " : " ", ac_chat_template_at(i)->name);
    fprintf(f, ";\n"
            "                              default: chatml if the vocabulary has <|im_start|>,\n"
            "                              else qa\n"
            "  --mmap      (no value) map the model file instead of reading it into memory\n"
            "              (default: read); the file must then not be changed or truncated\n"
            "              until the run ends\n"
            "The text goes to stdout; tok/s (tokens per second) and errors go to stderr.\n");
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
    const ac_chat_template *chat_template; /* --chat-template, or NULL: the vocabulary's choice */
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
    const char *stop[AC_MAX_STOPS]; /* --stop, in order */
    int n_stops;
} options;

enum { ARGS_RUN, ARGS_HELP, ARGS_VERSION, ARGS_BAD };

/* The options that take a value, by their short and long names (either may be NULL). */
typedef enum {
    OPT_TEMP, OPT_TOP_P, OPT_TOP_K, OPT_SEED, OPT_STEPS, OPT_PROMPT, OPT_TOKENIZER, OPT_MODE, OPT_SYSTEM,
    OPT_THREADS, OPT_QUANTIZE, OPT_OUT, OPT_BATCH, OPT_IGNORE_EOS, OPT_MODULE, OPT_MIN_P, OPT_REPEAT_PENALTY,
    OPT_REPEAT_LAST_N, OPT_PRESENCE_PENALTY, OPT_FREQUENCY_PENALTY, OPT_STOP, OPT_CHAT_TEMPLATE
} option_id;

static const struct {
    const char *short_name, *long_name;
    option_id id;
} OPTIONS[] = {
    {"-t", "--temp", OPT_TEMP}, {"-p", "--top-p", OPT_TOP_P}, {"-k", "--top-k", OPT_TOP_K},
    {"-s", "--seed", OPT_SEED}, {"-n", NULL, OPT_STEPS}, {"-i", NULL, OPT_PROMPT}, {"-z", NULL, OPT_TOKENIZER},
    {"-m", NULL, OPT_MODE}, {"-y", NULL, OPT_SYSTEM}, {"-T", NULL, OPT_THREADS}, {"-q", NULL, OPT_QUANTIZE},
    {"-o", NULL, OPT_OUT}, {"-b", NULL, OPT_BATCH}, {"-e", NULL, OPT_IGNORE_EOS}, {"-L", NULL, OPT_MODULE},
    {NULL, "--min-p", OPT_MIN_P}, {NULL, "--repeat-penalty", OPT_REPEAT_PENALTY},
    {NULL, "--repeat-last-n", OPT_REPEAT_LAST_N}, {NULL, "--presence-penalty", OPT_PRESENCE_PENALTY},
    {NULL, "--frequency-penalty", OPT_FREQUENCY_PENALTY}, {NULL, "--stop", OPT_STOP},
    {NULL, "--chat-template", OPT_CHAT_TEMPLATE},
};

/* The option called flag; -1 for none. */
static int find_option(const char *flag) {
    for (size_t i = 0; i < sizeof OPTIONS / sizeof OPTIONS[0]; i++)
        if ((OPTIONS[i].short_name && !strcmp(flag, OPTIONS[i].short_name)) ||
            (OPTIONS[i].long_name && !strcmp(flag, OPTIONS[i].long_name)))
            return (int)OPTIONS[i].id;
    return -1;
}

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

/* The library's verdict on the sampling settings: NULL, or why it refuses them (its message
 * after "... is invalid: ", since the caller names the flag and the value as typed). */
static const char *library_refusal(const ac_sampler_params *p) {
    if (ac_sampler_check_params(p) == AC_OK) return NULL;
    const char *why = ac_last_error(), *rule = strstr(why, "is invalid: ");
    return rule ? rule + strlen("is invalid: ") : why;
}

/* Sets a float sampling setting to x, as the library judges it.  x itself (a double, so
 * 1.0000001 is not rounded to 1 first) is accepted when the floats on both sides of it are:
 * the library's ranges have float bounds. */
static const char *set_sampling_float(ac_sampler_params *p, float *field, const char *val) {
    double x;
    const char *why = parse_float(val, &x);
    if (why) return why;
    float f = (float)x;
    *field = (double)f < x ? nextafterf(f, INFINITY) : (double)f > x ? nextafterf(f, -INFINITY) : f;
    why = library_refusal(p);
    *field = f;
    return why ? why : library_refusal(p);
}

static const char *set_sampling_int(ac_sampler_params *p, int *field, const char *val) {
    const char *why = parse_int(val, field);
    return why ? why : library_refusal(p);
}

/* Checks the value of an option and stores it; returns NULL, or why it is refused. */
static const char *parse_option(option_id id, const char *val, options *o, unsigned long long *seed) {
    const char *why = NULL;
    ac_sampler_params *sp = &o->sampling;
    switch (id) {
    case OPT_TEMP: return set_sampling_float(sp, &sp->temperature, val);
    case OPT_TOP_P: return set_sampling_float(sp, &sp->top_p, val);
    case OPT_TOP_K: return set_sampling_int(sp, &sp->top_k, val);
    case OPT_MIN_P: return set_sampling_float(sp, &sp->min_p, val);
    case OPT_REPEAT_PENALTY: return set_sampling_float(sp, &sp->repeat_penalty, val);
    case OPT_REPEAT_LAST_N: return set_sampling_int(sp, &sp->repeat_last_n, val);
    case OPT_PRESENCE_PENALTY: return set_sampling_float(sp, &sp->presence_penalty, val);
    case OPT_FREQUENCY_PENALTY: return set_sampling_float(sp, &sp->frequency_penalty, val);
    case OPT_SEED: return parse_u64(val, seed);
    case OPT_STEPS:
        if (!(why = parse_int(val, &o->steps)) && o->steps < 0)
            why = "the number of tokens must be >= 0 (0 = up to seq_len)";
        return why;
    case OPT_THREADS:
        if (!(why = parse_int(val, &o->threads)) && (o->threads < 1 || o->threads > AC_MAX_THREADS))
            why = "threads must be in 1.." STRINGIFY(AC_MAX_THREADS);
        return why;
    case OPT_BATCH:
        if (!(why = parse_int(val, &o->batch)) && (o->batch < 1 || o->batch > AC_MAX_BATCH))
            why = "the batch must be in 1.." STRINGIFY(AC_MAX_BATCH) " sequences";
        return why;
    case OPT_IGNORE_EOS:
        if (!(why = parse_int(val, &o->ignore_eos)) && o->ignore_eos != 0 && o->ignore_eos != 1)
            why = "must be 0 or 1";
        return why;
    case OPT_MODE:
        o->mode = val;
        return strcmp(val, "generate") && strcmp(val, "chat") ? "the mode must be generate or chat" : NULL;
    case OPT_QUANTIZE:
        o->int8 = !strcmp(val, "int8");
        return o->int8 ? NULL : "the only quantization is int8";
    case OPT_STOP:
        if (o->n_stops == AC_MAX_STOPS) return "too many stop strings (the most is " STRINGIFY(AC_MAX_STOPS) ")";
        o->stop[o->n_stops++] = val;
        return NULL;
    case OPT_CHAT_TEMPLATE:
        o->chat_template = ac_chat_template_get(val);
        return o->chat_template ? NULL : ac_last_error();
    case OPT_PROMPT: o->prompt = val; return NULL;
    case OPT_TOKENIZER: o->tokenizer = val; return NULL;
    case OPT_SYSTEM: o->system = val; return NULL;
    case OPT_OUT: o->out_path = val; return NULL;
    case OPT_MODULE: return parse_module(val, o);
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
    memset(o, 0, sizeof *o);
    o->model_path = argv[1];
    o->mode = "generate";
    o->sampling = ac_session_default_params().sampler;
    o->steps = ac_session_default_params().max_new_tokens;
    o->batch = 1;
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
        int id = find_option(flag);
        if (id < 0) {
            fprintf(stderr, "error: unknown option %s\n", flag);
            return ARGS_BAD;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "error: %s needs a value\n", flag);
            return ARGS_BAD;
        }
        const char *why = parse_option((option_id)id, argv[i + 1], o, &seed);
        if (why) {
            fprintf(stderr, "error: %s %s: %s\n", flag, argv[i + 1], why);
            return ARGS_BAD;
        }
    }
    int chat = !strcmp(o->mode, "chat");
    if (o->batch > 1 && chat) {
        fprintf(stderr, "error: -b applies to generate mode only\n");
        return ARGS_BAD;
    }
    if (o->chat_template && !chat) {
        fprintf(stderr, "error: --chat-template applies to chat mode only\n");
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

/* The stop strings of a generation: --stop's, then those of the chat template t (if any)
 * that are not among them.  Returns how many; stops[] and lens[] hold AC_MAX_STOPS + the
 * template's. */
enum { MAX_ALL_STOPS = AC_MAX_STOPS + AC_CHAT_MAX_STOPS };

static int stop_strings(const options *o, const ac_chat_template *t, const char **stops, size_t *lens) {
    int n = 0;
    for (int i = 0; i < o->n_stops; i++) stops[n++] = o->stop[i];
    for (int k = 0; t && k < AC_CHAT_MAX_STOPS && t->stop[k]; k++) {
        int known = 0;
        for (int i = 0; i < o->n_stops; i++) known |= !strcmp(o->stop[i], t->stop[k]);
        if (!known) stops[n++] = t->stop[k];
    }
    for (int i = 0; i < n; i++) lens[i] = strlen(stops[i]);
    return n;
}

/* A failed ac_session_set_stops / ac_batch_set_stops: the library's message, with the flag. */
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
    const char *stops[MAX_ALL_STOPS];
    size_t lens[MAX_ALL_STOPS];
    int n_stops = stop_strings(o, NULL, stops, lens);
    if (n_stops && ac_session_set_stops(s, stops, lens, n_stops)) return stops_refused();
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
    const char *stops[MAX_ALL_STOPS];
    size_t stop_lens[MAX_ALL_STOPS];
    int n_stops = stop_strings(o, NULL, stops, stop_lens);
    ac_batch *b = NULL;
    int rc = AC_OK;
    ac_session_params params = session_params(o, steps);
    if (!tokens || !results || !prompts || !lens) {
        fprintf(stderr, "error: out of memory for the tokens of %d sequences of up to %d tokens "
                "(%.1f MiB)\n", n, steps, (double)n * steps * sizeof *tokens / (1 << 20));
        rc = AC_ERR_NOMEM;
    } else if ((rc = ac_batch_create(model, tok, n, &params, &b))) {
        fprintf(stderr, "error: %s\n", ac_last_error());
    } else if (n_stops && (rc = ac_batch_set_stops(b, stops, stop_lens, n_stops))) {
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

/* The messages of a conversation (contents owned), and the token buffer its prompt is
 * rendered into (seq_len tokens). */
typedef struct {
    ac_chat_message *messages;
    int n, cap;
    int *tokens;
    int seq_len;
} conversation;

/* Appends a message (a copy of content); 0, or -1 when out of memory (printed). */
static int add_message(conversation *c, const char *role, const char *content, size_t len) {
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 16;
        ac_chat_message *grown = realloc(c->messages, (size_t)cap * sizeof *grown);
        if (!grown) {
            fprintf(stderr, "error: out of memory for the conversation (%d messages)\n", cap);
            return -1;
        }
        c->messages = grown;
        c->cap = cap;
    }
    char *copy = malloc(len + 1);
    if (!copy) {
        fprintf(stderr, "error: out of memory for a chat message of %zu bytes\n", len);
        return -1;
    }
    memcpy(copy, content, len);
    copy[len] = '\0';
    c->messages[c->n++] = (ac_chat_message){role, copy, len};
    return 0;
}

static void drop_last_message(conversation *c) { free((char *)c->messages[--c->n].content); }

/* The UTF-8 character at s[0..n) (n >= 1): returns its length and sets *state to 1 when it is
 * well-formed; else the length of the bytes one U+FFFD replaces (the longest start of a
 * well-formed sequence, at least 1) with *state 0, or -1 when those bytes are all of s and
 * more could complete them. */
static size_t utf8_char(const unsigned char *s, size_t n, int *state) {
    unsigned c = s[0];
    size_t len = c < 0x80 ? 1 : c < 0xC2 ? 0 : c <= 0xDF ? 2 : c <= 0xEF ? 3 : c <= 0xF4 ? 4 : 0;
    *state = len == 1;
    if (len <= 1) return 1;
    /* the second byte's range depends on the first (no overlongs, surrogates or > U+10FFFF) */
    unsigned lo = c == 0xE0 ? 0xA0 : c == 0xF0 ? 0x90 : 0x80, hi = c == 0xED ? 0x9F : c == 0xF4 ? 0x8F : 0xBF;
    size_t i = 1;
    for (; i < len && i < n; i++)
        if (s[i] < (i == 1 ? lo : 0x80) || s[i] > (i == 1 ? hi : 0xBF)) break;
    *state = i == len ? 1 : i == n ? -1 : 0;
    return i;
}

/* s[0..n) with every ill-formed part replaced by U+FFFD, as Python decodes it with
 * errors="replace" (so an answer joins the conversation as arianna_c's chat keeps it);
 * malloc'd, its length in *len; NULL when out of memory. */
static char *utf8_replaced(const char *s, size_t n, size_t *len) {
    char *out = malloc(3 * n + 1), *o = out;
    for (size_t i = 0, k; out && i < n; i += k) {
        int state;
        k = utf8_char((const unsigned char *)s + i, n - i, &state);
        memcpy(o, state == 1 ? s + i : "\xEF\xBF\xBD", state == 1 ? k : 3);
        o += state == 1 ? k : 3;
    }
    if (out) *len = (size_t)(o - out);
    return out;
}

/* Whether the code point is whitespace to Python's str.isspace(). */
static int is_space(unsigned cp) {
    return (cp >= 9 && cp <= 13) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
           cp == 0x3000;
}

/* The length of the character at s[0..n) when it is whitespace, 0 when it is not (or is
 * ill-formed), -1 when it is cut short (or n is 0).  The whitespace a template leaves before
 * an answer ("A:" then " The...") is not part of it, as in arianna_c's chat. */
static int space_at(const unsigned char *s, size_t n) {
    if (n == 0) return -1;
    int state;
    size_t len = utf8_char(s, n, &state);
    if (state != 1) return state;
    unsigned cp = len == 1 ? s[0] : len == 2 ? (s[0] & 0x1Fu) << 6 | (s[1] & 0x3Fu)
                : len == 3 ? (s[0] & 0x0Fu) << 12 | (s[1] & 0x3Fu) << 6 | (s[2] & 0x3Fu) : 0;
    return is_space(cp) ? (int)len : 0;
}

/* An answer as it streams: leading whitespace dropped (bytes that may start a whitespace
 * character wait for the next piece), the rest printed and kept for the conversation. */
typedef struct {
    char *text;
    size_t len, cap;
    int started;
    unsigned char pending[4];
    size_t n_pending;
} answer;

static int keep_answer(answer *a, const char *s, size_t n) {
    if (a->len + n > a->cap) {
        size_t cap = a->cap ? a->cap : 256;
        while (cap < a->len + n) cap *= 2;
        char *grown = realloc(a->text, cap);
        if (!grown) {
            fprintf(stderr, "error: out of memory for an answer of %zu bytes\n", a->len + n);
            return -1;
        }
        a->text = grown;
        a->cap = cap;
    }
    memcpy(a->text + a->len, s, n);
    a->len += n;
    return out_write(s, n) || out_flush() ? -1 : 0;
}

/* Takes a piece of the answer (final: the answer has ended, so a cut character is not
 * whitespace).  0, or -1 on an error (printed). */
static int answer_piece(answer *a, const char *piece, size_t len, int final) {
    while (!a->started && len > 0) {
        size_t take = len < sizeof a->pending - a->n_pending ? len : sizeof a->pending - a->n_pending;
        memcpy(a->pending + a->n_pending, piece, take);
        a->n_pending += take;
        piece += take;
        len -= take;
        int n;
        while ((n = space_at(a->pending, a->n_pending)) > 0) {
            memmove(a->pending, a->pending + n, a->n_pending - (size_t)n);
            a->n_pending -= (size_t)n;
        }
        if (n == 0) a->started = 1;
    }
    if (!a->started && !(final && a->n_pending)) return 0;
    a->started = 1;
    if (a->n_pending) {
        size_t n = a->n_pending;
        a->n_pending = 0;
        if (keep_answer(a, (const char *)a->pending, n)) return -1;
    }
    return len ? keep_answer(a, piece, len) : 0;
}

/* Renders the conversation and feeds it to a session that starts again from the settings'
 * seed, so each answer is sampled as arianna_c's Model.chat samples it for the same
 * messages.  Returns 1 when fed, 0 when the prompt leaves no room for an answer (said on
 * stdout: the conversation goes on), -1 on an error (printed). */
static int feed_conversation(ac_session *s, const ac_tokenizer *tok, const ac_session_params *params,
                             const ac_chat_template *t, conversation *c) {
    int n_tokens = 0;
    int rc = ac_chat_tokens(t, tok, c->messages, c->n, 1, c->tokens, c->seq_len, &n_tokens);
    if (rc == AC_ERR_RANGE || (!rc && n_tokens >= c->seq_len)) {
        char note[256];
        snprintf(note, sizeof note, "(this turn is too long: with it the conversation is %d tokens, and the "
                 "context holds %d (one left for the answer); the conversation goes on)\n", n_tokens, c->seq_len - 1);
        return out_text(note) || out_flush() ? -1 : 0;
    }
    if (!rc && !(rc = ac_session_set_params(s, params))) {
        ac_session_reset(s);
        rc = ac_session_feed_tokens(s, c->tokens, n_tokens);
    }
    if (rc) {
        fprintf(stderr, "error: %s\n", ac_last_error());
        return -1;
    }
    return 1;
}

/* Streams the answer to what was fed until the model ends it (BOS/EOS, a stop string), or
 * steps tokens; the answer joins the conversation.  0, or -1 on an error (printed). */
static int stream_answer(ac_session *s, conversation *c, int *context_full) {
    answer a = {0};
    int status = out_text("Assistant: ") ? -1 : 0;
    for (int token = 0; !status && token >= 0;) {
        const char *piece;
        size_t len;
        if (ac_session_next(s, &token, &piece, &len)) {
            fprintf(stderr, "error: %s\n", ac_last_error());
            status = -1;
        } else {
            status = answer_piece(&a, piece, len, token < 0); /* token -1: the answer ended */
        }
    }
    size_t len = 0;
    char *text = status ? NULL : utf8_replaced(a.text ? a.text : "", a.len, &len);
    if (!status && !text) fprintf(stderr, "error: out of memory for an answer of %zu bytes\n", a.len);
    if (!status) status = text ? add_message(c, "assistant", text, len) : -1;
    free(text);
    free(a.text);
    *context_full = ac_session_stop_reason(s) == AC_STOP_CONTEXT;
    return status || out_text("\n") || out_flush() ? -1 : 0;
}

/* The chat loop: each line of stdin is a user turn; the conversation (system prompt, turns,
 * answers) is rendered with the chat template and answered until the model ends the answer;
 * a turn that leaves no room for an answer is refused with its size and the conversation
 * goes on; an answer that fills the context ends the chat. */
static int chat(ac_session *s, const ac_tokenizer *tok, const ac_session_params *params, const options *o,
                int seq_len) {
    const ac_chat_template *t = o->chat_template ? o->chat_template : ac_chat_template_for(tok);
    const char *stops[MAX_ALL_STOPS];
    size_t lens[MAX_ALL_STOPS];
    int n_stops = stop_strings(o, t, stops, lens);
    if (ac_session_set_stops(s, stops, lens, n_stops)) return stops_refused();
    conversation c = {NULL, 0, 0, malloc((size_t)seq_len * sizeof(int)), seq_len};
    char *system = NULL, *line = NULL;
    size_t system_cap = 0, line_cap = 0;
    int status = c.tokens ? 0 : 1, context_full = 0;
    if (!c.tokens) fprintf(stderr, "error: out of memory for a prompt of %d tokens\n", seq_len);
    if (!status && !o->system && read_line("Enter system prompt (optional): ", &system, &system_cap) < 0) status = 1;
    const char *system_prompt = o->system ? o->system : system;
    if (!status && system_prompt && system_prompt[0])
        status = add_message(&c, "system", system_prompt, strlen(system_prompt)) ? 1 : 0;
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
        if (add_message(&c, "user", user, strlen(user))) {
            status = 1;
            break;
        }
        int fed = feed_conversation(s, tok, params, t, &c);
        if (fed == 0) drop_last_message(&c);
        if (fed < 0 || (fed > 0 && stream_answer(s, &c, &context_full))) status = 1;
    }
    if (context_full && !status) status = out_text("(the context is full)\n") ? 1 : 0;
    while (c.n > 0) drop_last_message(&c);
    free(c.messages);
    free(c.tokens);
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
static int run_model(const ac_model *model, const ac_tokenizer *tok, const options *o, int steps, int seq_len) {
    if (o->batch > 1) return generate_batch(model, tok, o, steps);
    ac_session *session = NULL;
    int status;
    ac_session_params params = session_params(o, steps);
    if (ac_session_create(model, tok, &params, &session)) {
        fprintf(stderr, "error: %s\n", ac_last_error());
        status = 1;
    } else {
        status = strcmp(o->mode, "chat") ? generate(session, o) : chat(session, tok, &params, o, seq_len);
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
        status = run_model(model, tok, &o, steps, cfg.seq_len);
    }
    ac_tokenizer_free(tok);
    ac_model_free(model);
    if (close_stdout()) status = 1;
    return status;
}
