/*
 * reference_listener: the smallest useful fanotify permission listener, for the benchmark.
 *
 *   reference_listener [-x] MOUNTPOINT
 *
 * FAN_CLASS_CONTENT group, FAN_OPEN_PERM (plus FAN_OPEN_EXEC_PERM with -x) on a
 * FAN_MARK_FILESYSTEM mark of MOUNTPOINT, which must be the root of a tmpfs (anything else is
 * refused, so it can never mark "/" or a real disk). Every event is allowed and its fd closed:
 * the figure it gives is the cost of one bare userspace round trip.
 *
 * Prints "ready" on stdout once the mark is in place; stops on SIGTERM or SIGINT and prints the
 * number of events it answered on stderr. If it dies, the kernel allows pending events.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <linux/fanotify.h>
#include <linux/magic.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static int refuse_unless_tmpfs_root(const char *path)
{
    char real[PATH_MAX], parent[PATH_MAX];
    struct statfs sfs;
    struct stat st, pst;
    if (!realpath(path, real)) {
        perror(path);
        return -1;
    }
    if (strcmp(real, "/") == 0) {
        fprintf(stderr, "refusing to mark /\n");
        return -1;
    }
    if (statfs(real, &sfs) != 0 || stat(real, &st) != 0) {
        perror(real);
        return -1;
    }
    if (sfs.f_type != TMPFS_MAGIC) {
        fprintf(stderr, "refusing: %s is not a tmpfs\n", real);
        return -1;
    }
    strcpy(parent, real);
    if (stat(dirname(parent), &pst) != 0 || pst.st_dev == st.st_dev) {
        fprintf(stderr, "refusing: %s is not the root of its own mount\n", real);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    int with_exec = 0;
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-x") == 0)
            with_exec = 1;
        else
            path = argv[i];
    }
    if (!path) {
        fprintf(stderr, "usage: %s [-x] MOUNTPOINT\n", argv[0]);
        return 2;
    }
    if (refuse_unless_tmpfs_root(path) != 0)
        return 2;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: read() returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int fan = syscall(SYS_fanotify_init, FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_UNLIMITED_QUEUE,
                      O_RDONLY | O_LARGEFILE | O_CLOEXEC);
    if (fan < 0) {
        perror("fanotify_init");
        return 1;
    }
    unsigned long long mask = FAN_OPEN_PERM | (with_exec ? FAN_OPEN_EXEC_PERM : 0);
    if (syscall(SYS_fanotify_mark, fan, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, AT_FDCWD, path) != 0) {
        perror("fanotify_mark");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);

    char buf[8192] __attribute__((aligned(__alignof__(struct fanotify_event_metadata))));
    unsigned long answered = 0;
    while (!stop) {
        ssize_t len = read(fan, buf, sizeof buf);
        if (len < 0) {
            if (errno == EINTR)
                continue;
            perror("read");
            break;
        }
        struct fanotify_event_metadata *m = (struct fanotify_event_metadata *)buf;
        for (; FAN_EVENT_OK(m, len); m = FAN_EVENT_NEXT(m, len)) {
            if (m->fd < 0)
                continue;
            if (m->mask & (FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM | FAN_ACCESS_PERM)) {
                struct fanotify_response r = {.fd = m->fd, .response = FAN_ALLOW};
                if (write(fan, &r, sizeof r) != sizeof r)
                    perror("write response");
                answered++;
            }
            close(m->fd);
        }
    }
    fprintf(stderr, "reference_listener: answered %lu events\n", answered);
    close(fan);
    return 0;
}
