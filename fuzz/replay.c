/*
 * replay.c - runs a fuzz harness on given files without libFuzzer, so that the regression
 * inputs in tests/fuzz_regressions/ replay in the normal test suite with any C compiler:
 *
 *   build-fuzz/replay_fuzz_encode FILE...     (built by `make fuzz-replay`)
 *
 * Exit status 0 when every file ran through the harness; a harness invariant that fails
 * aborts, and an unreadable file exits 2.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

static int replay_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return 0;
    }
    size_t cap = 4096, size = 0, n;
    uint8_t *data = malloc(cap);
    while (data && (n = fread(data + size, 1, cap - size, f)) > 0) {
        size += n;
        if (size == cap) data = realloc(data, cap *= 2);
    }
    int ok = data != NULL && !ferror(f);
    fclose(f);
    if (ok) LLVMFuzzerTestOneInput(data, size);
    else fprintf(stderr, "%s: cannot read\n", path);
    free(data);
    return ok;
}

int main(int argc, char **argv) {
    if (LLVMFuzzerInitialize) LLVMFuzzerInitialize(&argc, &argv);
    for (int i = 1; i < argc; i++) {
        if (!replay_file(argv[i])) return 2;
        printf("ok %s\n", argv[i]);
    }
    return 0;
}
