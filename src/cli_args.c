/*
 * cli_args.c - the ./run command line's options: the usage text (units and defaults, the
 * library's) and the parser, which names a bad flag, the value as typed and why it is
 * refused.  Numbers are whole strings; sampling settings are judged by the library
 * (ac_sampler_check_params), so ./run refuses what Model.generate refuses.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

#define STRINGIFY(x) STRINGIFY_(x)
#define STRINGIFY_(x) #x

/* ------------------------------------------------------------------------ usage */

void usage(FILE *f) {
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
            "              default: %s\n"
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
            "                              penalties look at, 0..%d (0 = none); default %d\n"
            "  --presence-penalty <float>  subtracted once from the logit of every token in\n"
            "                              the window (0 = off); default %g\n"
            "  --frequency-penalty <float> subtracted from a token's logit per time it is in\n"
            "                              the window (0 = off); default %g\n"
            "  --stop <string>             end the text before this string, never printing a\n"
            "                              part of it; repeatable (up to %d, in chat with the\n"
            "                              template's own); default: none\n"
            "  --chat-template <string>    chat: the template of the turns:",
            (double)d.sampler.temperature, (double)d.sampler.top_p, d.sampler.top_k, d.max_new_tokens, ac_tokenizer_lookup(), AC_MAX_THREADS,
            ac_default_threads(), AC_MAX_MODULES, AC_MAX_BATCH, (double)d.sampler.min_p,
            (double)d.sampler.repeat_penalty, AC_MAX_SEQ_LEN, d.sampler.repeat_last_n, (double)d.sampler.presence_penalty,
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
    /* AC_SEED_RANDOM asks for a random seed: it cannot be one */
    if (errno == ERANGE || v == AC_SEED_RANDOM) return "too large (the largest is 18446744073709551614)";
    *out = v;
    return NULL;
}

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

/* -L MODULE[:SCALE], split by the library's rule (ac_module_spec). */
static const char *parse_module(const char *val, options *o) {
    if (o->n_modules == AC_MAX_MODULES) return "too many modules (the most is " STRINGIFY(AC_MAX_MODULES) ")";
    ac_module_spec(val, &o->module_path_len[o->n_modules], &o->module_scale[o->n_modules]);
    o->module[o->n_modules++] = val;
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

int parse_args(int argc, char **argv, options *o) {
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

