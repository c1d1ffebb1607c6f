/*
 * logits_dump.c - writes a model's logits for a fixed prompt, float32 and then int8 (the
 * library's own quantization), to stdout as raw floats.  `make check-aarch64` runs it built
 * natively (with AC_KERNEL=scalar) and built for aarch64 (under qemu), and requires the two
 * outputs to be equal byte for byte: the portable kernels give the same bits on both CPUs.
 * `make check-x86-cpus` runs it under qemu-x86_64 as older x86-64 CPUs, each against the
 * native run of the set that CPU should get.  The kernel set used goes to stderr.
 *
 * usage: logits_dump MODEL.bin > logits.raw
 */
#include <stdio.h>
#include <stdlib.h>

#include "run.h"

enum { N_TOKENS = 24 };

static int fail(const char *what) {
    fprintf(stderr, "logits_dump: %s: %s\n", what, ac_last_error());
    return 1;
}

/* The logits of every prompt position, written out; 0 on success. */
static int dump(const ac_model *m, const int *tokens, int n, int vocab_size) {
    float *logits = malloc(sizeof(float) * (size_t)n * (size_t)vocab_size);
    ac_state *s = NULL;
    int rc = !logits || ac_state_create(m, &s) || ac_logits(s, tokens, n, logits);
    if (!rc && fwrite(logits, sizeof(float), (size_t)n * (size_t)vocab_size, stdout) != (size_t)n * (size_t)vocab_size)
        rc = 1;
    ac_state_free(s);
    free(logits);
    return rc;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: logits_dump MODEL.bin > logits.raw\n");
        return 2;
    }
    ac_model *m = NULL, *q = NULL;
    ac_config c;
    if (ac_model_load(argv[1], &m) || ac_model_config(m, &c)) return fail(argv[1]);
    fprintf(stderr, "kernels: %s\n", ac_kernel_name());
    int tokens[N_TOKENS];
    for (int i = 0; i < N_TOKENS; i++) tokens[i] = (1 + 37 * i) % c.vocab_size; /* spread over the vocabulary */
    int n = c.seq_len < N_TOKENS ? c.seq_len : N_TOKENS;
    if (dump(m, tokens, n, c.vocab_size)) return fail("float32 logits");
    if (ac_model_quantize(m, 0, &q) || dump(q, tokens, n, c.vocab_size)) return fail("int8 logits");
    ac_model_free(q);
    ac_model_free(m);
    return 0;
}
