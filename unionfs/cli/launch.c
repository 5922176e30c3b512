/* The `unionmount` command as scripts/setup installs it: hands the command to a running
 * `unionmount server` (unionfs/cli/server.py) without starting Python, else runs the
 * Python entry point (unionfs/cli/fast.py) in its place.
 *
 * The protocol is fast.py's: the request is "unionmount-command/1", the package directory,
 * the working directory, the number of arguments, the arguments and the environment,
 * NUL-separated, sent with this process's stdin, stdout and stderr (SCM_RIGHTS); the server
 * answers the pid of the child that runs the command (signals are forwarded to it) and then
 * its exit status, or -1 when it is another installation of unionmount.
 *
 * Guarantees: the command runs exactly once, by the server or by Python (the server answers
 * -1 before it runs anything); anything unexpected from the server before it took the command
 * (no server, a refused connection, a short answer) falls back to Python. Built with
 * -DPACKAGE="<checkout>/unionfs" and -DFALLBACK="<venv>/bin/unionmount".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef PACKAGE
#error "build with -DPACKAGE=\"<checkout>/unionfs\""
#endif
#ifndef FALLBACK
#error "build with -DFALLBACK=\"<venv>/bin/unionmount\""
#endif

#define MAGIC "unionmount-command/1"
#define OTHER_INSTALLATION (-1)

extern char **environ;
static volatile pid_t child = 0;

static void run_here(char **argv) {
    argv[0] = (char *)FALLBACK;
    execv(FALLBACK, argv);
    fprintf(stderr, "unionmount: cannot run %s: %s\n", FALLBACK, strerror(errno));
    exit(127);
}

static void forward(int sig) {
    if (child > 0)
        kill(child, sig);
}

/* Append s and its NUL to the buffer; 0 on success. */
static int put(char **buf, size_t *len, size_t *cap, const char *s) {
    size_t n = strlen(s) + 1;
    if (*len + n > *cap) {
        size_t want = (*cap ? *cap : 4096);
        while (*len + n > want)
            want *= 2;
        char *b = realloc(*buf, want);
        if (b == NULL)
            return -1;
        *buf = b;
        *cap = want;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    return 0;
}

static int socket_path(char *out, size_t size) {
    const char *explicit = getenv("UNIONMOUNT_SERVER");
    int n;
    if (explicit != NULL && *explicit)
        n = snprintf(out, size, "%s", explicit);
    else if (geteuid() == 0)
        n = snprintf(out, size, "/run/unionmount/server.sock");
    else {
        const char *xdg = getenv("XDG_RUNTIME_DIR");
        if (xdg != NULL)
            n = snprintf(out, size, "%s/unionmount/server.sock", xdg);
        else
            n = snprintf(out, size, "/tmp/unionmount-%u/unionmount/server.sock", (unsigned)geteuid());
    }
    return n > 0 && (size_t)n < size ? 0 : -1;
}

/* Exactly n bytes into buf; 0 on success, -1 if the stream ended first. */
static int receive(int s, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(s, (char *)buf + got, n - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *off = getenv("UNIONMOUNT_NO_SERVER");
    if ((off != NULL && strcmp(off, "1") == 0) || (argc > 1 && strcmp(argv[1], "server") == 0))
        run_here(argv);

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (socket_path(addr.sun_path, sizeof addr.sun_path) != 0)
        run_here(argv);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr) != 0)
        run_here(argv);

    char cwd[8192], count[16];
    if (getcwd(cwd, sizeof cwd) == NULL)
        run_here(argv);
    snprintf(count, sizeof count, "%d", argc - 1);
    char *buf = NULL;
    size_t len = 0, cap = 0;
    int bad = put(&buf, &len, &cap, MAGIC) || put(&buf, &len, &cap, PACKAGE) || put(&buf, &len, &cap, cwd) ||
              put(&buf, &len, &cap, count);
    for (int i = 1; i < argc && !bad; i++)
        bad = put(&buf, &len, &cap, argv[i]);
    for (char **e = environ; *e != NULL && !bad; e++)
        bad = put(&buf, &len, &cap, *e);
    if (bad)
        run_here(argv);
    len--; /* the fields are NUL-separated, not NUL-terminated */

    int fds[3] = {0, 1, 2};
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cm), fds, sizeof fds);
    ssize_t sent = sendmsg(s, &msg, MSG_NOSIGNAL);
    while (sent >= 0 && (size_t)sent < len) {
        ssize_t more = send(s, buf + sent, len - (size_t)sent, MSG_NOSIGNAL);
        if (more < 0 && errno == EINTR)
            continue;
        sent = more < 0 ? more : sent + more;
    }
    shutdown(s, SHUT_WR); /* the end of the request (a server that gave up on it says so below) */
    free(buf);

    int32_t pid, code;
    if (receive(s, &pid, sizeof pid) != 0)
        run_here(argv); /* no child took the command */
    child = pid;
    struct sigaction sa = {.sa_handler = forward};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    if (receive(s, &code, sizeof code) != 0) {
        fputs("unionmount: the command server ended the command without an answer\n", stderr);
        return 1;
    }
    if (code == OTHER_INSTALLATION) {
        close(s);
        run_here(argv);
    }
    return code & 0xff;
}
