/*
 * cli.h - what the ./run command line's two files share: the options as parsed, and the
 * parser and usage text (cli_args.c) that main (cli.c) calls.
 */
#ifndef ARIANNA_CLI_H
#define ARIANNA_CLI_H

#include <stddef.h>
#include <stdio.h>

#include "run.h"

/* The options as given (strings point into argv); the library's defaults where none was. */
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

/* What parse_args found: options to run with, -h / --help, --version, or a usage error. */
enum { ARGS_RUN, ARGS_HELP, ARGS_VERSION, ARGS_BAD };

/* Reads argv into o.  A usage error is printed here, naming the flag, the value as typed and
 * why it is refused (the caller adds the usage text). */
int parse_args(int argc, char **argv, options *o);
/* The usage: every option with its unit and default (the library's defaults). */
void usage(FILE *f);

#endif /* ARIANNA_CLI_H */
