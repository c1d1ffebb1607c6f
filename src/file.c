/*
 * file.c - opening and reading the files the library loads (models and tokenizers), so that
 * both refuse the same non-files with the same messages and survive the same short reads.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

/* O_NONBLOCK so that a FIFO or device node is refused instead of blocking the open (it has
 * no effect on reading regular files). */
int ac_open_regular_file(const char *path, const char *what, int *fd_out, size_t *size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return ac_fail(AC_ERR_IO, "%s: cannot open %s file: %s", path, what, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return ac_fail(AC_ERR_IO, "%s: cannot stat %s file: %s", path, what, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return ac_fail(AC_ERR_IO, "%s: cannot use it as the %s file: it is %s, not a regular file",
                       path, what, S_ISDIR(st.st_mode) ? "a directory" : "a special file");
    }
    *fd_out = fd;
    *size = (size_t)st.st_size;
    return AC_OK;
}

int ac_read_fully(int fd, void *buf, size_t size, const char *path, const char *what) {
    size_t got = 0;
    int e = 0;
    while (got < size) { /* read() may return less than asked */
        ssize_t n = read(fd, (unsigned char *)buf + got, size - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) e = errno;
        if (n <= 0) break;
        got += (size_t)n;
    }
    if (got == size) return AC_OK;
    return ac_fail(AC_ERR_IO, "%s: read %zu of %zu %s bytes: %s", path, got, size, what,
                   e ? strerror(e) : "the file shrank while reading");
}
