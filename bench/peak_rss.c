/*
 * peak_rss.c - run a command and report its peak resident set size.
 *
 *   peak_rss OUTFILE COMMAND [ARGS...]
 *
 * Forks, execs COMMAND, waits for it with wait4 and writes its ru_maxrss (KiB) to OUTFILE;
 * exits with the command's exit status (128 + signal number when it was killed).
 *
 * Why a C launcher: Linux starts a child's ru_maxrss at the RSS of the process it was forked
 * from, so a child forked straight from the benchmark's Python process would report at least
 * that process's size (hundreds of MB once torch is imported).  This launcher is about 1 MB.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: peak_rss OUTFILE COMMAND [ARGS...]\n");
        return 2;
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("peak_rss: fork");
        return 2;
    }
    if (pid == 0) {
        execvp(argv[2], argv + 2);
        perror("peak_rss: exec");
        _exit(127);
    }
    int status = 0;
    struct rusage ru;
    if (wait4(pid, &status, 0, &ru) < 0) {
        perror("peak_rss: wait4");
        return 2;
    }
    FILE *f = fopen(argv[1], "w");
    if (f) {
        fprintf(f, "%ld\n", ru.ru_maxrss);
        fclose(f);
    }
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return 2;
}
