/* test_forkserver_garbage.c — a forkserver's control socket is untrusted input: packets
 * of the wrong size, magic or kind, with too few or too many descriptors, are dropped
 * (their descriptors closed) and the server goes on serving. After the garbage a real
 * request still gets a child, whose garbage start frame makes it exit 2, which the
 * server reports on the status socket. Runs the luamp program beside this test. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

#include "test_util.h"

static void send_with_fds(int fd, const void *p, size_t n, const int *fds, int nfds) {
  union { char buf[CMSG_SPACE(sizeof(int) * 8)]; struct cmsghdr align; } u;
  memset(&u, 0, sizeof u);
  struct iovec iov = {.iov_base = (void *)p, .iov_len = n};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
  if (nfds > 0) {
    mh.msg_control = u.buf;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
  }
  if (sendmsg(fd, &mh, MSG_NOSIGNAL) < 0) perror("sendmsg");
}

/* A request {magic, kind} with fresh start and status sockets; returns our status end
 * (and our start end in *start) */
static int request(int ctl, const char *magic, int32_t kind, size_t len, int nfds, int *start) {
  int st[2], sv[2];
  socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, st);
  socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv);
  char pkt[64] = {0};
  memcpy(pkt, magic, 4);
  memcpy(pkt + 4, &kind, 4);
  int fds[4] = {sv[1], st[1], sv[1], st[1]};
  send_with_fds(ctl, pkt, len, fds, nfds);
  close(sv[1]);
  close(st[1]);
  *start = sv[0];
  return st[0];
}

/* 1 if the status socket reached EOF (the server dropped the request and its fds) */
static int dropped(int status) {
  struct pollfd p = {.fd = status, .events = POLLIN};
  if (poll(&p, 1, 10000) != 1) return 0;
  char b[8];
  return recv(status, b, sizeof b, MSG_DONTWAIT) == 0;
}

int main(void) {
  char exe[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n <= 0) return 1;
  exe[n] = '\0';
  strcpy(strrchr(exe, '/') + 1, "luamp");

  int ctl[2];
  socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, ctl);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, ctl[1], 3);
  char me[24];
  snprintf(me, sizeof me, "%d", (int)getpid());
  char *argv[] = {exe, "--luamp-forkserver", "3", me, NULL};
  pid_t server;
  int spawned = posix_spawn(&server, exe, &fa, NULL, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  if (spawned != 0) { perror(exe); return 1; }
  close(ctl[1]);

  struct { const char *what, *magic; int32_t kind; size_t len; int nfds; } bad[] = {
    {"short packet", "LFSQ", 0, 4, 2},
    {"long packet", "LFSQ", 0, 40, 2},
    {"bad magic", "XXXX", 0, 8, 2},
    {"bad kind", "LFSQ", 7, 8, 2},
    {"negative kind", "LFSQ", -1, 8, 2},
    {"no descriptors", "LFSQ", 0, 8, 0},
    {"one descriptor", "LFSQ", 0, 8, 1},
    {"four descriptors", "LFSQ", 0, 8, 4},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    int start;
    int status = request(ctl[0], bad[i].magic, bad[i].kind, bad[i].len, bad[i].nfds, &start);
    if (bad[i].nfds >= 2) CHECK(dropped(status), "%s: not dropped", bad[i].what);
    close(status);
    close(start);
    CHECK(waitpid(server, NULL, WNOHANG) == 0, "%s: the server died", bad[i].what);
  }

  /* a real request: a child, whose garbage frame makes it exit 2, reported */
  int start;
  int status = request(ctl[0], "LFSQ", 0, 8, 2, &start);
  if (write(start, "garbage garbage garbage", 23) != 23) perror("write");
  close(start);
  struct pollfd p = {.fd = status, .events = POLLIN};
  int32_t pid = 0, code = -100;
  CHECK(poll(&p, 1, 10000) == 1, "no reply");
  CHECK(recv(status, &pid, sizeof pid, 0) == sizeof pid && pid > 0, "reply %d", (int)pid);
  CHECK(poll(&p, 1, 10000) == 1, "no exit status");
  CHECK(recv(status, &code, sizeof code, 0) == sizeof code && code == 2, "exit code %d", (int)code);
  close(status);

  /* EOF on the control socket: the server exits */
  close(ctl[0]);
  int st;
  CHECK(waitpid(server, &st, 0) == server && WIFEXITED(st) && WEXITSTATUS(st) == 0,
        "server status %x", st);
  if (failures) fprintf(stderr, "%d failure(s)\n", failures);
  else printf("test_forkserver_garbage: all passed\n");
  return failures ? 1 : 0;
}
