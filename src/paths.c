/*
 * paths.c - where the files a model needs are found: the tokenizer that goes with a model
 * file.  The CLI, the Python package and the NumPy reference all ask this one lookup, so a
 * model finds the same tokenizer whichever front end loads it.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

/* Tokenizer files looked for in the model's folder when none is named, in order; and the same
 * in words, for help texts (ac_tokenizer_lookup). */
#define DEFAULT_TOKENIZER_1 "tokenizer.bin"
#define DEFAULT_TOKENIZER_2 "tok4096.bin"
static const char *const DEFAULT_TOKENIZERS[] = {DEFAULT_TOKENIZER_1, DEFAULT_TOKENIZER_2};
static const char DEFAULT_LOOKUP_TEXT[] = DEFAULT_TOKENIZER_1 ", then " DEFAULT_TOKENIZER_2 " in the model's folder";
enum { MAX_CANDIDATES = 4 };

/* folder (the first folder_len bytes of a path, "" or ending in '/') + name + suffix, malloc'd. */
static char *join(const char *folder, size_t folder_len, const char *name, const char *suffix) {
    size_t n = folder_len + strlen(name) + strlen(suffix) + 1;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%.*s%s%s", (int)folder_len, folder, name, suffix);
    return p;
}

/* The candidates in lookup order; returns how many (-1 when out of memory). */
static int candidates(const char *model_path, const char *name, char *out[MAX_CANDIDATES]) {
    const char *slash = model_path ? strrchr(model_path, '/') : NULL;
    size_t folder_len = slash ? (size_t)(slash - model_path) + 1 : 0;
    int n = 0;
    if (name) {
        out[n++] = join("", 0, name, "");
        out[n++] = join("", 0, name, ".bin");
        if (model_path && name[0] != '/') {
            out[n++] = join(model_path, folder_len, name, "");
            out[n++] = join(model_path, folder_len, name, ".bin");
        }
    } else if (model_path) {
        for (size_t i = 0; i < sizeof DEFAULT_TOKENIZERS / sizeof DEFAULT_TOKENIZERS[0]; i++)
            out[n++] = join(model_path, folder_len, DEFAULT_TOKENIZERS[i], "");
    }
    for (int i = 0; i < n; i++)
        if (!out[i]) {
            for (int j = 0; j < n; j++) free(out[j]);
            return -1;
        }
    return n;
}

AC_API const char *ac_tokenizer_lookup(void) { return DEFAULT_LOOKUP_TEXT; }

AC_API int ac_tokenizer_path(const char *model_path, const char *name, char *buf, size_t cap) {
    if (!buf || cap == 0) return ac_fail(AC_ERR_ARG, "ac_tokenizer_path: no buffer");
    buf[0] = '\0';
    char *tried[MAX_CANDIDATES];
    int n = candidates(model_path, name, tried);
    if (n < 0) return ac_fail(AC_ERR_NOMEM, "ac_tokenizer_path: out of memory");
    if (n == 0)
        return ac_fail(AC_ERR_IO, "no tokenizer file found; tried: nothing (name a tokenizer for a model "
                                  "loaded from memory)");
    int found = -1;
    struct stat st;
    for (int i = 0; i < n && found < 0; i++)
        if (lstat(tried[i], &st) == 0) found = i; /* exists, whatever it is */
    int rc = AC_OK;
    if (found >= 0 && strlen(tried[found]) >= cap)
        rc = ac_fail(AC_ERR_RANGE, "ac_tokenizer_path: %s is longer than the %zu-byte buffer", tried[found], cap);
    else if (found >= 0)
        memcpy(buf, tried[found], strlen(tried[found]) + 1);
    else {
        rc = ac_fail(AC_ERR_IO, "no tokenizer file found; tried:");
        for (int i = 0; i < n; i++) {
            ac_append_error(i ? ", " : " ");
            ac_append_error(tried[i]);
        }
    }
    for (int i = 0; i < n; i++) free(tried[i]);
    return rc;
}
