/*
 * cli.c - the ./run command line: generate text from a model file, or chat with it.
 *
 *   ./run MODEL [-t temp] [-p topp] [-k topk] [-s seed] [-n steps] [-i prompt] [-z tokenizer]
 *               [-m generate|chat] [-y system_prompt] [-T threads] [-q int8] [-o out.bin]
 *               [-b batch] [-e 0|1]
 *
 * The text goes to stdout (the prompt, then the continuation), "achieved tok/s: X" (decode:
 * the tokens after the first) and "prompt tok/s: Y" (prefill) to stderr.
 * Bad flags or values print the usage to stderr and exit 1; load errors print the library's
 * message and exit 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "run.h"

static void usage(void) {
    fprintf(stderr,
            "Usage:   run <model.bin> [options]\n"
            "Example: run persona/arianna_v1_base.bin -z tok4096 -n 256 -i \"Resonance is\"\n"
            "Options:\n"
            "  -t <float>  temperature in [0,inf), default 1.0 (0 = greedy)\n"
            "  -p <float>  top-p (nucleus) in (0,1], default 0.9 (1 = off)\n"
            "  -k <int>    top-k, default 0 (off)\n"
            "  -s <int>    random seed, default: time-based (also for 0)\n"
            "  -n <int>    tokens to generate, default 256 (0 = up to seq_len); prompt plus\n"
            "              generated tokens never exceed the model's seq_len\n"
            "  -i <string> input prompt\n"
            "  -z <string> tokenizer: NAME, NAME.bin, then both in the model's folder;\n"
            "              default tokenizer.bin, then tok4096.bin in the model's folder\n"
            "  -m <string> mode: generate|chat, default generate\n"
            "  -y <string> system prompt in chat mode\n"
            "  -T <int>    threads, default: all available cores\n"
            "  -q <string> quantize a float32 model at load: int8 (an int8 file is used as it is)\n"
            "  -o <string> write the model (quantized with -q int8) to this file and exit\n"
            "  -b <int>    generate mode: advance N sequences together (seeds s, s+1, ...),\n"
            "              print each in turn and report the total tok/s; default 1\n"
            "  -e <int>    generate mode: 1 = do not stop when the model ends the text (BOS/EOS):\n"
            "              always -n tokens (up to seq_len), e.g. for timing; default 0\n");
}

/* ------------------------------------------------------------------------ argument parsing */

static int parse_float(const char *s, float *out) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end) return 0;
    *out = v;
    return 1;
}

static int parse_int(const char *s, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < INT_MIN || v > INT_MAX) return 0;
    *out = (int)v;
    return 1;
}

static int parse_u64(const char *s, unsigned long long *out) {
    char *end;
    errno = 0;
    if (*s == '-') return 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end) return 0;
    *out = v;
    return 1;
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
} options;

/* Returns 1 when argv is well-formed (values checked for syntax only; the library checks
 * the sampler's ranges). */
static int parse_args(int argc, char **argv, options *o) {
    if (argc < 2 || argv[1][0] == '-') return 0;
    o->model_path = argv[1];
    o->tokenizer = o->prompt = o->system = NULL;
    o->mode = "generate";
    o->sampling = ac_sampler_default_params();
    o->steps = 256;
    o->out_path = NULL;
    o->threads = 0;
    o->int8 = 0;
    o->batch = 1;
    o->ignore_eos = 0;
    unsigned long long seed = 0;
    for (int i = 2; i < argc; i += 2) {
        const char *flag = argv[i];
        if (i + 1 >= argc || flag[0] != '-' || strlen(flag) != 2) return 0;
        const char *val = argv[i + 1];
        int ok;
        switch (flag[1]) {
        case 't': ok = parse_float(val, &o->sampling.temperature); break;
        case 'p': ok = parse_float(val, &o->sampling.top_p); break;
        case 'k': ok = parse_int(val, &o->sampling.top_k); break;
        case 's': ok = parse_u64(val, &seed); break;
        case 'n': ok = parse_int(val, &o->steps) && o->steps >= 0; break;
        case 'i': o->prompt = val; ok = 1; break;
        case 'z': o->tokenizer = val; ok = 1; break;
        case 'y': o->system = val; ok = 1; break;
        case 'm':
            o->mode = val;
            ok = !strcmp(val, "generate") || !strcmp(val, "chat");
            break;
        case 'T': ok = parse_int(val, &o->threads) && o->threads >= 1; break;
        case 'q': ok = o->int8 = !strcmp(val, "int8"); break;
        case 'o': o->out_path = val; ok = 1; break;
        case 'b': ok = parse_int(val, &o->batch) && o->batch >= 1; break;
        case 'e': ok = parse_int(val, &o->ignore_eos) && (o->ignore_eos == 0 || o->ignore_eos == 1); break;
        default: ok = 0;
        }
        if (!ok) {
            fprintf(stderr, "error: bad option %s %s\n", flag, val);
            return 0;
        }
    }
    if (o->batch > 1 && !strcmp(o->mode, "chat")) {
        fprintf(stderr, "error: -b applies to generate mode only\n");
        return 0;
    }
    /* seed 0 means "not chosen": derive one from the clock so runs differ */
    o->sampling.seed = seed ? seed : (unsigned long long)time(NULL) * 2654435761ull + 1;
    return 1;
}

/* ------------------------------------------------------------------------ tokenizer lookup */

static int is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Finds the tokenizer file: for -z NAME tries NAME, NAME.bin, then both inside the model's
 * folder; without -z tries tokenizer.bin then tok4096.bin in the model's folder.  On failure
 * returns NULL with the paths tried listed in tried. */
static char *find_tokenizer(const char *model_path, const char *name, char *tried, size_t tried_size) {
    char dir[PATH_MAX];
    const char *slash = strrchr(model_path, '/');
    if (slash) snprintf(dir, sizeof dir, "%.*s", (int)(slash - model_path), model_path);
    else snprintf(dir, sizeof dir, ".");
    if (slash == model_path) snprintf(dir, sizeof dir, "/");

    char candidates[4][PATH_MAX + 16];
    int n = 0;
    if (name) {
        snprintf(candidates[n++], sizeof candidates[0], "%s", name);
        snprintf(candidates[n++], sizeof candidates[0], "%s.bin", name);
        if (name[0] != '/') {
            snprintf(candidates[n++], sizeof candidates[0], "%s/%s", dir, name);
            snprintf(candidates[n++], sizeof candidates[0], "%s/%s.bin", dir, name);
        }
    } else {
        snprintf(candidates[n++], sizeof candidates[0], "%s/tokenizer.bin", dir);
        snprintf(candidates[n++], sizeof candidates[0], "%s/tok4096.bin", dir);
    }
    tried[0] = '\0';
    for (int i = 0; i < n; i++) {
        if (is_file(candidates[i])) return strdup(candidates[i]);
        size_t used = strlen(tried);
        snprintf(tried + used, tried_size - used, "%s%s", i ? ", " : "", candidates[i]);
    }
    return NULL;
}

/* ------------------------------------------------------------------------ generate mode */

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct {
    int count;
    int n_prompt;              /* prompt tokens, BOS included */
    double start, first, last; /* times of the start, the first and the latest token */
} speed;

static int print_piece(void *user, int token, const char *piece, size_t len) {
    (void)token;
    speed *sp = user;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    sp->last = now_seconds();
    if (sp->count++ == 0) sp->first = sp->last;
    return 0;
}

static void report_speed(const speed *sp) {
    /* the first token's time includes the prompt, so the rate counts the tokens after it */
    if (sp->count > 1 && sp->last > sp->first)
        fprintf(stderr, "achieved tok/s: %f\n", (sp->count - 1) / (sp->last - sp->first));
    /* prefill (+ sampling the first token) */
    if (sp->count > 0 && sp->first > sp->start)
        fprintf(stderr, "prompt tok/s: %f\n", sp->n_prompt / (sp->first - sp->start));
}

/* The prompt's tokens with BOS in front, in a malloc'd array; NULL when out of memory. */
static int *encode_prompt(const ac_tokenizer *tok, const char *prompt, int *n) {
    size_t len = strlen(prompt);
    int *tokens = malloc((len + 3) * sizeof *tokens);
    if (tokens && ac_encode(tok, prompt, len, 1, 0, tokens, (int)len + 3, n)) {
        free(tokens);
        return NULL;
    }
    return tokens;
}

static int generate(ac_session *s, const ac_tokenizer *tok, const options *o, int steps) {
    const char *prompt = o->prompt ? o->prompt : "";
    speed sp = {0, 0, 0, 0, 0};
    int *prompt_tokens = encode_prompt(tok, prompt, &sp.n_prompt);
    free(prompt_tokens);
    fputs(prompt, stdout);
    fflush(stdout);
    sp.start = now_seconds();
    int rc = prompt_tokens ? ac_session_set_ignore_eos(s, o->ignore_eos) : AC_ERR_NOMEM;
    if (!rc) rc = ac_generate(s, prompt, strlen(prompt), steps, print_piece, &sp, NULL);
    printf("\n");
    fflush(stdout); /* the text ends before the speed report on stderr */
    if (rc) {
        fprintf(stderr, "error: %s\n", ac_last_error());
        return 1;
    }
    report_speed(&sp);
    return 0;
}

/* -b N: N sequences of the same prompt advanced together, seeds s, s+1, ...; each is printed
 * in turn after all have finished, and the rate is the total over all of them (the time
 * includes the prompts' prefill). */
static int generate_batch(const ac_model *model, const ac_tokenizer *tok, const options *o,
                          int steps) {
    const char *prompt = o->prompt ? o->prompt : "";
    int n = o->batch, n_prompt = 0;
    size_t len = strlen(prompt);
    int *prompt_tokens = encode_prompt(tok, prompt, &n_prompt);
    int *tokens = malloc((size_t)n * (size_t)steps * sizeof *tokens);
    int *counts = malloc((size_t)n * sizeof *counts);
    const char **prompts = malloc((size_t)n * sizeof *prompts);
    size_t *lens = malloc((size_t)n * sizeof *lens);
    ac_batch *b = NULL;
    int rc = (prompt_tokens && tokens && counts && prompts && lens) ? AC_OK : AC_ERR_NOMEM;
    if (rc) fprintf(stderr, "error: out of memory for %d sequences\n", n);
    else if ((rc = ac_batch_create(model, tok, n, &o->sampling, &b))) {
        fprintf(stderr, "error: %s\n", ac_last_error());
        if (rc == AC_ERR_ARG) usage();
    } else if ((rc = ac_batch_set_threads(b, o->threads)) || (rc = ac_batch_set_ignore_eos(b, o->ignore_eos))) {
        fprintf(stderr, "error: %s\n", ac_last_error());
    }
    double start = now_seconds(), end = start;
    if (!rc) {
        for (int i = 0; i < n; i++) {
            prompts[i] = prompt;
            lens[i] = len;
        }
        rc = ac_batch_generate(b, prompts, lens, steps, tokens, counts);
        end = now_seconds();
        if (rc) fprintf(stderr, "error: %s\n", ac_last_error());
    }
    long long total = 0;
    for (int i = 0; !rc && i < n; i++) {
        printf("=== sequence %d (seed %llu) ===\n%s", i,
               (unsigned long long)(o->sampling.seed + (uint64_t)i), prompt);
        int prev = prompt_tokens[n_prompt - 1];
        for (int k = 0; k < counts[i]; k++) {
            int token = tokens[(size_t)i * steps + k];
            const char *piece;
            size_t piece_len;
            if (ac_decode_piece(tok, prev, token, &piece, &piece_len) == AC_OK)
                fwrite(piece, 1, piece_len, stdout);
            prev = token;
        }
        printf("\n");
        total += counts[i];
    }
    if (!rc && total > 0 && end > start)
        fprintf(stderr, "achieved tok/s: %f (total of %d sequences)\n", total / (end - start), n);
    ac_batch_free(b);
    free(prompt_tokens);
    free(tokens);
    free(counts);
    free(prompts);
    free(lens);
    return rc ? 1 : 0;
}

/* ------------------------------------------------------------------------ chat mode */

/* Reads one line from stdin without its newline; returns 0 at end of input. */
static int read_line(const char *question, char *buf, size_t size) {
    printf("%s", question);
    fflush(stdout);
    if (!fgets(buf, (int)size, stdin)) return 0;
    buf[strcspn(buf, "\n")] = '\0';
    return 1;
}

/* A Llama-2-style [INST] loop: each user turn is fed with BOS, the assistant answers until
 * it emits EOS, and the KV cache carries the whole conversation until seq_len is used up. */
static int chat(ac_session *s, const options *o, int steps) {
    char system[4096] = "", user[4096], turn[8192 + 64];
    if (o->system) snprintf(system, sizeof system, "%s", o->system);
    else if (!read_line("Enter system prompt (optional): ", system, sizeof system)) system[0] = '\0';
    for (int first = 1;; first = 0) {
        if (first && o->prompt) snprintf(user, sizeof user, "%s", o->prompt);
        else if (!read_line("User: ", user, sizeof user)) break;
        if (first && system[0])
            snprintf(turn, sizeof turn, "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", system, user);
        else
            snprintf(turn, sizeof turn, "[INST] %s [/INST]", user);
        int rc = ac_session_feed(s, turn, strlen(turn), 1);
        if (rc == AC_ERR_RANGE) {
            printf("\n(the context is full)\n");
            break;
        }
        if (rc) {
            fprintf(stderr, "error: %s\n", ac_last_error());
            return 1;
        }
        printf("Assistant: ");
        int token = -1;
        for (int n = 0; n < steps; n++) {
            const char *piece;
            size_t len;
            if ((rc = ac_session_next(s, &token, &piece, &len))) {
                fprintf(stderr, "error: %s\n", ac_last_error());
                return 1;
            }
            if (token < 0 || token == AC_TOKEN_EOS || token == AC_TOKEN_BOS) break;
            fwrite(piece, 1, len, stdout);
            fflush(stdout);
        }
        printf("\n");
        if (token < 0) {
            printf("(the context is full)\n");
            break;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ main */

/* Loads the model; -q int8 quantizes a float32 one (an int8 file is used as it is). */
static ac_model *load_model(const options *o) {
    ac_model *model = NULL, *quantized = NULL;
    if (ac_model_load(o->model_path, &model)) {
        fprintf(stderr, "error: %s\n", ac_last_error());
        return NULL;
    }
    ac_config cfg;
    ac_model_config(model, &cfg);
    if (!o->int8 || cfg.group_size) return model;
    int rc = ac_model_quantize(model, 0, &quantized);
    ac_model_free(model);
    if (rc) fprintf(stderr, "error: %s: %s\n", o->model_path, ac_last_error());
    return quantized;
}

int main(int argc, char **argv) {
    if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        usage();
        return 0;
    }
    options o;
    if (!parse_args(argc, argv, &o)) {
        usage();
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

    char tried[4 * (PATH_MAX + 16) + 8];
    char *tok_path = find_tokenizer(o.model_path, o.tokenizer, tried, sizeof tried);
    if (!tok_path) {
        fprintf(stderr, "error: no tokenizer file found; tried: %s\n", tried);
        ac_model_free(model);
        return 1;
    }
    ac_tokenizer *tok = NULL;
    int rc = ac_tokenizer_load(tok_path, cfg.vocab_size, &tok);
    free(tok_path);
    if (rc) {
        fprintf(stderr, "error: %s\n", ac_last_error());
        ac_model_free(model);
        return 1;
    }

    int steps = (o.steps == 0 || o.steps > cfg.seq_len) ? cfg.seq_len : o.steps;
    int status;
    if (o.batch > 1) {
        status = generate_batch(model, tok, &o, steps);
    } else {
        ac_session *session = NULL;
        if ((rc = ac_session_create(model, tok, &o.sampling, &session)) ||
            (rc = ac_session_set_threads(session, o.threads))) {
            fprintf(stderr, "error: %s\n", ac_last_error());
            if (rc == AC_ERR_ARG) usage();
            status = 1;
        } else {
            status = strcmp(o.mode, "chat") ? generate(session, tok, &o, steps) : chat(session, &o, steps);
        }
        ac_session_free(session);
    }

    ac_tokenizer_free(tok);
    ac_model_free(model);
    return status;
}
