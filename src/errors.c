/*
 * errors.c - how the library reports failure: every failing call returns an AC_ERR_* code
 * and leaves a message for the calling thread (ac_last_error); ac_strerror names the codes.
 * The version string lives here too, as the one other fact about the library as a whole, and
 * ac_grow, the one realloc, so that every growing buffer fails alike.
 */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#define AC_STRINGIFY(x) #x
#define AC_VERSION_TEXT(major, minor, patch) AC_STRINGIFY(major) "." AC_STRINGIFY(minor) "." AC_STRINGIFY(patch)

/* One message buffer per thread: no global mutable state shared between threads. */
static _Thread_local char g_error[1024];

int ac_fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
    return code;
}

void ac_append_error(const char *text) {
    size_t used = strlen(g_error);
    snprintf(g_error + used, sizeof g_error - used, "%s", text);
}

AC_API const char *ac_last_error(void) { return g_error; }

int ac_grow(void **buf, size_t *cap, size_t need, size_t item, const char *what) {
    if (need <= *cap) return AC_OK;
    size_t cap2 = *cap ? *cap : 256;
    while (cap2 < need && cap2 <= SIZE_MAX / 2 / item) cap2 *= 2;
    void *grown = cap2 >= need ? realloc(*buf, cap2 * item) : NULL;
    if (!grown) return ac_fail(AC_ERR_NOMEM, "out of memory for %s (%zu)", what, need);
    *buf = grown;
    *cap = cap2;
    return AC_OK;
}

AC_API const char *ac_strerror(int code) {
    switch (code) {
    case AC_OK: return "AC_OK";
    case AC_ERR_IO: return "AC_ERR_IO";
    case AC_ERR_FORMAT: return "AC_ERR_FORMAT";
    case AC_ERR_MISMATCH: return "AC_ERR_MISMATCH";
    case AC_ERR_ARG: return "AC_ERR_ARG";
    case AC_ERR_NOMEM: return "AC_ERR_NOMEM";
    case AC_ERR_RANGE: return "AC_ERR_RANGE";
    case AC_ERR_NUMERIC: return "AC_ERR_NUMERIC";
    default: return "AC_ERR_UNKNOWN";
    }
}

/* The version macros are in run.h, the one place they are written. */
AC_API const char *ac_version(void) {
    return AC_VERSION_TEXT(AC_VERSION_MAJOR, AC_VERSION_MINOR, AC_VERSION_PATCH);
}

AC_API int ac_version_number(void) { return AC_VERSION_MAJOR * 10000 + AC_VERSION_MINOR * 100 + AC_VERSION_PATCH; }

AC_API int ac_abi_version(void) { return AC_ABI_VERSION; }
