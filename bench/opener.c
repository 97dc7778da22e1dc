/*
 * opener: the benchmark's load generator.
 *
 *   opener LISTFILE ITERATIONS MODE OUTFILE [--wait-stdin]
 *
 * LISTFILE   one path per line.
 * ITERATIONS how many passes over the whole list.
 * MODE       "read": open(O_RDONLY) + read to EOF + close, timed as one op;
 *            "exec": fork + execv(path, {path}) + waitpid, timed as one op.
 * OUTFILE    binary, one little-endian int64 per op, in op order (pass by pass, list order):
 *            the op's duration in nanoseconds (CLOCK_MONOTONIC); negative if the op failed
 *            (open refused, exec failed, child exited non-zero), so a denial is visible.
 * --wait-stdin  read one byte from stdin before the first op (lets the harness start several
 *            openers at the same moment).
 *
 * On stdout, one line:  start_ns=S end_ns=E ops=N failed=F first_errno=X
 * (S and E are CLOCK_MONOTONIC, comparable across processes on this machine.)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static char **read_list(const char *file, size_t *count)
{
    FILE *f = fopen(file, "r");
    if (!f) {
        perror(file);
        exit(2);
    }
    size_t cap = 1024, n = 0;
    char **v = malloc(cap * sizeof *v);
    char *line = NULL;
    size_t len = 0;
    ssize_t r;
    while ((r = getline(&line, &len, f)) != -1) {
        while (r > 0 && (line[r - 1] == '\n' || line[r - 1] == '\r'))
            line[--r] = '\0';
        if (r == 0)
            continue;
        if (n == cap) {
            cap *= 2;
            v = realloc(v, cap * sizeof *v);
        }
        v[n++] = strdup(line);
    }
    free(line);
    fclose(f);
    *count = n;
    return v;
}

static char buf[1 << 16];

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s LISTFILE ITERATIONS read|exec OUTFILE [--wait-stdin]\n", argv[0]);
        return 2;
    }
    size_t n;
    char **paths = read_list(argv[1], &n);
    long iters = strtol(argv[2], NULL, 10);
    int exec_mode;
    if (strcmp(argv[3], "read") == 0)
        exec_mode = 0;
    else if (strcmp(argv[3], "exec") == 0)
        exec_mode = 1;
    else {
        fprintf(stderr, "mode must be read or exec\n");
        return 2;
    }
    if (iters < 1 || n == 0) {
        fprintf(stderr, "nothing to do (iterations=%ld, paths=%zu)\n", iters, n);
        return 2;
    }
    size_t total = n * (size_t)iters;
    int64_t *res = calloc(total, sizeof *res);
    if (!res) {
        perror("calloc");
        return 2;
    }
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);

    if (argc > 5 && strcmp(argv[5], "--wait-stdin") == 0) {
        char c;
        if (read(0, &c, 1) < 0)
            perror("read stdin");
    }

    long failed = 0;
    int first_errno = 0;
    size_t k = 0;
    int64_t start = now_ns();
    for (long it = 0; it < iters; it++) {
        for (size_t i = 0; i < n; i++, k++) {
            int ok = 1;
            int64_t t0 = now_ns();
            if (!exec_mode) {
                int fd = open(paths[i], O_RDONLY | O_CLOEXEC);
                if (fd < 0) {
                    ok = 0;
                    if (!first_errno)
                        first_errno = errno;
                } else {
                    while (read(fd, buf, sizeof buf) > 0)
                        ;
                    close(fd);
                }
            } else {
                pid_t pid = fork();
                if (pid == 0) {
                    if (devnull >= 0) {
                        dup2(devnull, 0);
                        dup2(devnull, 1);
                    }
                    char *av[] = {paths[i], NULL};
                    char *ev[] = {NULL};
                    execve(paths[i], av, ev);
                    _exit(126 + (errno == EPERM || errno == EACCES ? 0 : 1));
                } else if (pid < 0) {
                    ok = 0;
                    if (!first_errno)
                        first_errno = errno;
                } else {
                    int st;
                    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
                        ;
                    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                        ok = 0;
                        if (!first_errno)
                            first_errno = WIFEXITED(st) ? (WEXITSTATUS(st) == 126 ? EPERM : ENOEXEC) : EINTR;
                    }
                }
            }
            int64_t d = now_ns() - t0;
            if (!ok) {
                failed++;
                d = -(d ? d : 1);
            }
            res[k] = d;
        }
    }
    int64_t end = now_ns();

    FILE *out = fopen(argv[4], "wb");
    if (!out || fwrite(res, sizeof *res, total, out) != total || fclose(out) != 0) {
        perror(argv[4]);
        return 2;
    }
    printf("start_ns=%lld end_ns=%lld ops=%zu failed=%ld first_errno=%d\n", (long long)start,
           (long long)end, total, failed, first_errno);
    return 0;
}
