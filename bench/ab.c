/*
 * ab.c - side-by-side speed of two builds of libarianna.so (or two kernel sets of one build)
 * in one process, for deciding whether a change is faster on a machine that is not quiet.
 *
 * Both libraries are opened with dlopen (RTLD_LOCAL, so their symbols do not mix), each loads
 * the model and keeps its own state, and the measurement alternates between them round after
 * round (A B, B A, A B, ...), so drift in the machine's load reaches both alike.  Reported:
 * each side's median rate and the median of the per-round ratios B / A (each pair ran back to
 * back), with their spread.
 *
 *   cc -O2 -Isrc -o ab bench/ab.c -ldl
 *   ab [-r ROUNDS] [-T THREADS] [-c] [-q] [-n TOKENS] [-b BATCH] [-w decode|prefill|batch]
 *      [-z TOKENIZER] MODEL LIB_A[:KERNEL] LIB_B[:KERNEL]
 *
 *   -r  rounds (default 11)            -T  threads (default 1)
 *   -c  time in this process's CPU time, not wall time (with -T 1 only): the time a busy
 *       machine gives to other processes does not count
 *   -q  quantize to int8 at load       -n  tokens per measurement (default 250)
 *   -b  sequences for -w batch (16)    -z  tokenizer (needed by -w batch)
 *   -w  decode: TOKENS ac_forward calls from position 0; prefill: one ac_logits over TOKENS
 *       tokens; batch: ac_batch_generate of BATCH greedy sequences of TOKENS tokens after
 *       "Resonance is", end of text ignored.  Rates are tokens per second (all sequences).
 *   :KERNEL sets AC_KERNEL for that library (read once, when it first picks its kernels), so
 *       one build can be compared with itself under two kernel sets (copy the .so to a second
 *       path: dlopen returns the same handle for the same path).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "run.h"

/* The library's functions, typed by the public header (so build ab against the same run.h). */
#define FN(name) __typeof__(&name) name
typedef struct {
    const char *path, *kernel;
    void *handle;
    FN(ac_kernel_name);
    FN(ac_last_error);
    FN(ac_model_load);
    FN(ac_model_quantize);
    FN(ac_state_create);
    FN(ac_state_set_threads);
    FN(ac_forward);
    FN(ac_logits);
    FN(ac_tokenizer_load);
    FN(ac_session_default_params);
    FN(ac_batch_create);
    FN(ac_batch_generate);
    ac_model *model;
    ac_state *state;
    ac_tokenizer *tok;
    ac_batch *batch;
} side;
#undef FN

typedef struct {
    const char *what, *model, *tokenizer;
    int rounds, threads, int8, tokens, n_seqs, vocab;
    int *ids;
    float *out;
    int *gen_tokens;
    ac_batch_result *gen_results;
} settings;

static clockid_t g_clock = CLOCK_MONOTONIC;

static double now(void) {
    struct timespec ts;
    clock_gettime(g_clock, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(const char *what, const char *detail) {
    fprintf(stderr, "ab: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(1);
}

static void *sym(side *s, const char *name) {
    void *p = dlsym(s->handle, name);
    if (!p) die(name, dlerror());
    return p;
}
#define LOOKUP(s, name) (*(void **)&(s)->name = sym((s), #name))

static void check(side *s, int rc, const char *call) {
    if (rc != 0) {
        fprintf(stderr, "ab: %s: %s failed (%d): %s\n", s->path, call, rc, s->ac_last_error());
        exit(1);
    }
}

/* Opens the library, picks its kernels under AC_KERNEL=kernel, loads the model. */
static void open_side(side *s, const settings *cfg) {
    s->handle = dlopen(s->path, RTLD_NOW | RTLD_LOCAL);
    if (!s->handle) die("dlopen", dlerror());
    LOOKUP(s, ac_kernel_name);
    LOOKUP(s, ac_last_error);
    LOOKUP(s, ac_model_load);
    LOOKUP(s, ac_model_quantize);
    LOOKUP(s, ac_state_create);
    LOOKUP(s, ac_state_set_threads);
    LOOKUP(s, ac_forward);
    LOOKUP(s, ac_logits);
    if (s->kernel) setenv("AC_KERNEL", s->kernel, 1);
    else unsetenv("AC_KERNEL");
    const char *name = s->ac_kernel_name();
    unsetenv("AC_KERNEL");
    check(s, s->ac_model_load(cfg->model, &s->model), "ac_model_load");
    if (cfg->int8) {
        ac_model *q;
        check(s, s->ac_model_quantize(s->model, 0, &q), "ac_model_quantize");
        s->model = q; /* the float32 model stays loaded until exit */
    }
    check(s, s->ac_state_create(s->model, &s->state), "ac_state_create");
    check(s, s->ac_state_set_threads(s->state, cfg->threads), "ac_state_set_threads");
    if (!strcmp(cfg->what, "batch")) {
        if (!cfg->tokenizer) die("-w batch needs -z TOKENIZER", NULL);
        LOOKUP(s, ac_tokenizer_load);
        LOOKUP(s, ac_session_default_params);
        LOOKUP(s, ac_batch_create);
        LOOKUP(s, ac_batch_generate);
        check(s, s->ac_tokenizer_load(cfg->tokenizer, cfg->vocab, &s->tok), "ac_tokenizer_load");
        ac_session_params p = s->ac_session_default_params();
        p.sampler.temperature = 0.0f; /* greedy */
        p.max_new_tokens = cfg->tokens;
        p.n_threads = cfg->threads;
        p.ignore_eos = 1;
        check(s, s->ac_batch_create(s->model, s->tok, cfg->n_seqs, &p, &s->batch), "ac_batch_create");
    }
    fprintf(stderr, "%s: kernels %s\n", s->path, name);
}

/* One measurement on side s: tokens per second. */
static double measure(side *s, const settings *cfg) {
    double t0 = now();
    long tokens = cfg->tokens;
    if (!strcmp(cfg->what, "decode")) {
        for (int pos = 0; pos < cfg->tokens; pos++)
            check(s, s->ac_forward(s->state, cfg->ids[pos], pos, NULL), "ac_forward");
    } else if (!strcmp(cfg->what, "prefill")) {
        check(s, s->ac_logits(s->state, cfg->ids, cfg->tokens, cfg->out), "ac_logits");
    } else {
        const char *prompts[256];
        size_t lens[256];
        for (int i = 0; i < cfg->n_seqs; i++) {
            prompts[i] = "Resonance is";
            lens[i] = strlen(prompts[i]);
        }
        check(s, s->ac_batch_generate(s->batch, prompts, lens, cfg->gen_tokens, cfg->gen_results),
              "ac_batch_generate");
        tokens = 0;
        for (int i = 0; i < cfg->n_seqs; i++) tokens += cfg->gen_results[i].n_generated;
    }
    return (double)tokens / (now() - t0);
}

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, compare);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* "path:kernel" -> path, kernel (NULL when absent). */
static void parse_side(side *s, char *arg) {
    char *colon = strrchr(arg, ':');
    s->path = arg;
    s->kernel = NULL;
    if (colon) {
        *colon = '\0';
        s->kernel = colon + 1;
    }
}

/* The model's vocab_size and seq_len, from its header (the seven int32 after a v1/v2 magic
 * and version, or at the start of a v0 file). */
static void model_shape(const char *path, int *vocab, int *seq_len) {
    int32_t h[9];
    FILE *f = fopen(path, "rb");
    if (!f || fread(h, sizeof h, 1, f) != 1) die("cannot read the model header", path);
    fclose(f);
    const int32_t *p = h[0] == 0x616B3432 ? h + 2 : h;
    *vocab = p[5] < 0 ? -p[5] : p[5];
    *seq_len = p[6];
}

int main(int argc, char **argv) {
    settings cfg = {"decode", NULL, NULL, 11, 1, 0, 250, 16, 0, NULL, NULL, NULL, NULL};
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        const char *opt = argv[i];
        if (!strcmp(opt, "-q")) { cfg.int8 = 1; continue; }
        if (!strcmp(opt, "-c")) { g_clock = CLOCK_PROCESS_CPUTIME_ID; continue; }
        if (i + 1 >= argc) die("missing value after", opt);
        const char *val = argv[++i];
        if (!strcmp(opt, "-r")) cfg.rounds = atoi(val);
        else if (!strcmp(opt, "-T")) cfg.threads = atoi(val);
        else if (!strcmp(opt, "-n")) cfg.tokens = atoi(val);
        else if (!strcmp(opt, "-b")) cfg.n_seqs = atoi(val);
        else if (!strcmp(opt, "-w")) cfg.what = val;
        else if (!strcmp(opt, "-z")) cfg.tokenizer = val;
        else die("unknown option", opt);
    }
    if (g_clock != CLOCK_MONOTONIC && cfg.threads != 1) die("-c needs -T 1 (the CPU time of several threads adds up)", NULL);
    if (argc - i != 3 || cfg.rounds < 1 || cfg.rounds > 999 || cfg.n_seqs < 1 || cfg.n_seqs > 256 ||
        (strcmp(cfg.what, "decode") && strcmp(cfg.what, "prefill") && strcmp(cfg.what, "batch"))) {
        fprintf(stderr, "usage: ab [-r ROUNDS] [-T THREADS] [-c] [-q] [-n TOKENS] [-b BATCH] "
                        "[-w decode|prefill|batch] [-z TOKENIZER] MODEL LIB_A[:KERNEL] LIB_B[:KERNEL]\n");
        return 1;
    }
    cfg.model = argv[i];
    int seq_len;
    model_shape(cfg.model, &cfg.vocab, &seq_len);
    if (cfg.tokens < 1 || cfg.tokens > seq_len) die("-n must be in 1..seq_len", NULL);
    cfg.ids = malloc((size_t)cfg.tokens * sizeof(int));
    cfg.out = malloc((size_t)cfg.tokens * (size_t)cfg.vocab * sizeof(float));
    cfg.gen_tokens = malloc((size_t)cfg.tokens * (size_t)cfg.n_seqs * sizeof(int));
    cfg.gen_results = malloc((size_t)cfg.n_seqs * sizeof *cfg.gen_results);
    if (!cfg.ids || !cfg.out || !cfg.gen_tokens || !cfg.gen_results) die("out of memory", NULL);
    cfg.ids[0] = 1; /* BOS, then a fixed spread of ordinary tokens */
    for (int t = 1; t < cfg.tokens; t++) cfg.ids[t] = 3 + (int)((7919u * (unsigned)t) % (unsigned)(cfg.vocab - 3));

    side sides[2];
    parse_side(&sides[0], argv[i + 1]);
    parse_side(&sides[1], argv[i + 2]);
    for (int k = 0; k < 2; k++) open_side(&sides[k], &cfg);
    for (int k = 0; k < 2; k++) measure(&sides[k], &cfg); /* warm-up: caches, page faults, threads */

    double *a = malloc((size_t)cfg.rounds * sizeof(double)), *b = malloc((size_t)cfg.rounds * sizeof(double));
    double *ratio = malloc((size_t)cfg.rounds * sizeof(double));
    if (!a || !b || !ratio) die("out of memory", NULL);
    for (int r = 0; r < cfg.rounds; r++) {
        if (r % 2 == 0) {
            a[r] = measure(&sides[0], &cfg);
            b[r] = measure(&sides[1], &cfg);
        } else {
            b[r] = measure(&sides[1], &cfg);
            a[r] = measure(&sides[0], &cfg);
        }
        ratio[r] = b[r] / a[r];
    }
    double ma = median(a, cfg.rounds), mb = median(b, cfg.rounds), mr = median(ratio, cfg.rounds);
    printf("%s %s T%d%s, %d rounds: A %.0f tok/s, B %.0f tok/s, B/A median %.3f (range %.3f-%.3f)\n", cfg.what,
           cfg.int8 ? "int8" : "f32", cfg.threads, g_clock == CLOCK_MONOTONIC ? "" : " (CPU time)", cfg.rounds, ma,
           mb, mr, ratio[0], ratio[cfg.rounds - 1]);
    return 0;
}
