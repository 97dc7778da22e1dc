/* agent.c: a minimal vetd scanning agent in C that denies files starting with the EICAR string.
 *
 * It speaks protocol version 1 of docs/agent-protocol.md with no JSON library: replies are
 * written with snprintf, and requests are read by a small scanner that walks the top-level
 * object and picks out the three fields it needs ("type", "versions", "id").
 *
 *   build:  gcc -O2 -Wall -o agent agent.c        (or: make)
 *   run:    ./agent /run/vetd-c-agent.sock
 *
 * One process per connection (fork), so a crash while scanning one file costs one connection,
 * never the agent. Children die with the parent (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define PROTOCOL_VERSION 1
#define MAX_FRAME 65536

static const char EICAR[] =
    "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
#define EICAR_LEN (sizeof EICAR - 1) /* 68 */

/* ---- frames -------------------------------------------------------------------------------- */

/* Read exactly n bytes. File descriptors that arrive are counted in *nfds; the first is kept in
 * *fd, any others are closed. Returns 1 when done, 0 on EOF before the first byte, -1 on error. */
static int recv_exactly(int s, char *buf, size_t n, int *fd, int *nfds)
{
    size_t got = 0;
    while (got < n) {
        union { char buf[CMSG_SPACE(8 * sizeof(int))]; struct cmsghdr align; } cbuf;
        struct iovec iov = { .iov_base = buf + got, .iov_len = n - got };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
                             .msg_control = cbuf.buf, .msg_controllen = sizeof cbuf.buf };
        ssize_t r = recvmsg(s, &mh, MSG_CMSG_CLOEXEC);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < k; i++) {
                int f;
                memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof f);
                if (*fd < 0)
                    *fd = f;
                else
                    close(f);
                (*nfds)++;
            }
        }
        if (mh.msg_flags & MSG_CTRUNC)
            *nfds += 1000; /* more than we had room for: certainly not exactly one */
        if (r == 0)
            return got == 0 ? 0 : -1;
        got += (size_t)r;
    }
    return 1;
}

/* One frame into body (NUL-terminated). Returns its length, 0 on a clean EOF, -1 on an I/O
 * error, -2 on a bad length or a NUL inside the JSON. */
static long recv_frame(int s, char *body, int *fd, int *nfds)
{
    unsigned char hdr[4];
    *fd = -1;
    *nfds = 0;
    int r = recv_exactly(s, (char *)hdr, 4, fd, nfds);
    if (r <= 0)
        return r;
    uint32_t n = ((uint32_t)hdr[0] << 24) | ((uint32_t)hdr[1] << 16) | ((uint32_t)hdr[2] << 8) | hdr[3];
    if (n == 0 || n > MAX_FRAME)
        return -2;
    if (recv_exactly(s, body, n, fd, nfds) != 1)
        return -1;
    body[n] = '\0';
    if (memchr(body, '\0', n))
        return -2;
    return (long)n;
}

static int send_frame(int s, const char *json)
{
    size_t n = strlen(json);
    char buf[4 + 1024];
    if (n > sizeof buf - 4)
        return -1;
    uint32_t be = htonl((uint32_t)n);
    memcpy(buf, &be, 4);
    memcpy(buf + 4, json, n);
    for (size_t off = 0; off < n + 4;) {
        ssize_t w = send(s, buf + off, n + 4 - off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        off += (size_t)w;
    }
    return 0;
}

/* ---- just enough JSON ---------------------------------------------------------------------- */

static const char *skip_ws(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
        p++;
    return p;
}

/* p at an opening quote; returns the char after the closing one, or NULL. */
static const char *skip_string(const char *p)
{
    for (p++; *p; p++) {
        if (*p == '\\') {
            if (!*++p)
                return NULL;
        } else if (*p == '"') {
            return p + 1;
        }
    }
    return NULL;
}

/* Skip one value of any kind; NULL if it is malformed as far as we can tell. */
static const char *skip_value(const char *p)
{
    if (*p == '"')
        return skip_string(p);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (*p) {
            if (*p == '"') {
                if (!(p = skip_string(p)))
                    return NULL;
                continue;
            }
            if (*p == '{' || *p == '[')
                depth++;
            else if (*p == '}' || *p == ']')
                if (--depth == 0)
                    return p + 1;
            p++;
        }
        return NULL;
    }
    const char *start = p;
    while (*p && !strchr(",}] \t\r\n", *p))
        p++;
    return p == start ? NULL : p;
}

/* The value of top-level key `key` in a JSON object, or NULL. */
static const char *find_key(const char *json, const char *key)
{
    size_t klen = strlen(key);
    const char *p = skip_ws(json);
    if (*p++ != '{')
        return NULL;
    for (;;) {
        p = skip_ws(p);
        if (*p != '"')
            return NULL;
        const char *k = p + 1, *end = skip_string(p);
        if (!end)
            return NULL;
        int match = (size_t)(end - 1 - k) == klen && memcmp(k, key, klen) == 0;
        p = skip_ws(end);
        if (*p++ != ':')
            return NULL;
        p = skip_ws(p);
        if (match)
            return p;
        if (!(p = skip_value(p)))
            return NULL;
        p = skip_ws(p);
        if (*p++ != ',')
            return NULL;
    }
}

/* Does the top-level string field `key` equal `want` exactly? */
static int field_is(const char *json, const char *key, const char *want)
{
    const char *v = find_key(json, key);
    size_t n = strlen(want);
    return v && v[0] == '"' && strncmp(v + 1, want, n) == 0 && v[1 + n] == '"';
}

/* A top-level non-negative integer field; -1 if absent or not one. */
static long long field_uint(const char *json, const char *key)
{
    const char *v = find_key(json, key);
    if (!v || *v < '0' || *v > '9')
        return -1;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (errno || x > (1ULL << 53) - 1 || (*end && !strchr(",} \t\r\n", *end)))
        return -1;
    return (long long)x;
}

/* Is `version` in the "versions" array? 1 yes, 0 no, -1 malformed. */
static int offers_version(const char *json, long version)
{
    const char *p = find_key(json, "versions");
    int found = 0, count = 0;
    if (!p || *p++ != '[')
        return -1;
    for (;;) {
        p = skip_ws(p);
        if (*p == ']')
            return count ? found : -1;
        if (*p < '0' || *p > '9')
            return -1;
        char *end;
        long v = strtol(p, &end, 10);
        found |= v == version;
        count++;
        p = skip_ws(end);
        if (*p == ',')
            p++;
        else if (*p != ']')
            return -1;
    }
}

/* ---- one connection ------------------------------------------------------------------------ */

static void send_error(int s, long long id, const char *code, const char *message)
{
    char json[512], idbuf[32];
    if (id < 0)
        snprintf(idbuf, sizeof idbuf, "null");
    else
        snprintf(idbuf, sizeof idbuf, "%lld", id);
    snprintf(json, sizeof json, "{\"type\":\"error\",\"id\":%s,\"code\":\"%s\",\"message\":\"%s\"}",
             idbuf, code, message);
    send_frame(s, json);
}

static void serve_connection(int s)
{
    static char body[MAX_FRAME + 1];
    char json[512];
    int fd, nfds;
    long n = recv_frame(s, body, &fd, &nfds);
    if (fd >= 0)
        close(fd);
    if (n <= 0 || !field_is(body, "type", "hello")) {
        if (n != 0 && n != -1)
            send_error(s, -1, "bad_request", "expected a hello frame");
        return;
    }
    switch (offers_version(body, PROTOCOL_VERSION)) {
    case 1:
        break;
    case 0:
        send_error(s, -1, "unsupported_version", "this agent speaks protocol version 1 only");
        return;
    default:
        send_error(s, -1, "bad_request", "hello: versions must be a list of integers");
        return;
    }
    snprintf(json, sizeof json, "{\"type\":\"hello\",\"version\":%d,\"software\":\"c-agent 1.0\"}",
             PROTOCOL_VERSION);
    if (send_frame(s, json) < 0)
        return;

    for (;;) {
        n = recv_frame(s, body, &fd, &nfds);
        if (n <= 0) {
            if (fd >= 0)
                close(fd);
            if (n == -2)
                send_error(s, -1, "bad_request", "bad frame length or NUL in JSON");
            return;
        }
        long long id = field_uint(body, "id");
        if (!field_is(body, "type", "scan") || id < 0) {
            if (fd >= 0)
                close(fd);
            send_error(s, -1, "bad_request", "expected a scan with an integer id");
            return;
        }
        if (nfds != 1) {
            if (fd >= 0)
                close(fd);
            send_error(s, id, "bad_request", "a scan carries exactly one file descriptor");
            continue;
        }
        char head[EICAR_LEN];
        ssize_t got = pread(fd, head, EICAR_LEN, 0); /* through the fd: never open the path */
        int saved = errno;
        close(fd);
        if (got < 0) {
            send_error(s, id, "scan_failed", strerror(saved));
            continue;
        }
        int bad = got == (ssize_t)EICAR_LEN && memcmp(head, EICAR, EICAR_LEN) == 0;
        snprintf(json, sizeof json,
                 "{\"type\":\"verdict\",\"id\":%lld,\"decision\":\"%s\",\"reason\":\"%s\","
                 "\"cacheable\":true,\"ttl_s\":null}",
                 id, bad ? "deny" : "allow", bad ? "EICAR-Test-File" : "");
        if (send_frame(s, json) < 0)
            return;
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s SOCKET_PATH\n", argv[0]);
        return 2;
    }
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(argv[1]) >= sizeof addr.sun_path) {
        fprintf(stderr, "agent: socket path too long\n");
        return 2;
    }
    strcpy(addr.sun_path, argv[1]);
    signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
    signal(SIGPIPE, SIG_IGN);

    struct stat st;
    if (lstat(argv[1], &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(argv[1]); /* left by an agent that died */
    int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ls < 0 || bind(ls, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(ls, 64) < 0) {
        perror("agent: listen");
        return 1;
    }
    pid_t parent = getpid();
    fprintf(stderr, "agent: listening on %s\n", argv[1]);
    for (;;) {
        int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            perror("agent: accept");
            return 1;
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(ls);
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            if (getppid() != parent)
                _exit(0);
            struct timeval tv = { .tv_sec = 10 }; /* a client that stops reading costs 10 s */
            setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
            serve_connection(c);
            _exit(0);
        }
        if (pid < 0)
            perror("agent: fork");
        close(c);
    }
}
