/*
 * forkserver.c — the forkserver start method: the server process, and the caller's side
 * of talking to it.
 *
 * The server is a clean spawn of the luamp executable (or of a host through
 * luamp_child_main): `<exe> --luamp-forkserver 3 <creator pid>`, started by the first
 * forkserver child a process asks for. spawn.c opens its Lua state (the standard
 * libraries and luamp: nothing of the caller, no module, no global) and hands it over
 * with its start-frame runner; the server compiles every part of luamp once, then forks
 * one child per request. A child runs its start message exactly as a spawn child does,
 * but in the state the server already opened: no exec, no loading. This file sits in the
 * top layer beside spawn.c and module.c (which opens its Lua binding) and calls only
 * below: process.c for the fork and the child records.
 *
 * The wire is SOCK_SEQPACKET, one packet per message, everything checked:
 *  - control socket (caller -> server): {"LFSQ", kind} with two descriptors, the child's
 *    end of its start socket and the server's end of a fresh status socket;
 *  - status socket (server -> caller): {pid} with the child's pidfd, made by the server
 *    while the child cannot have been reaped (so it is that child, whatever pid reuse
 *    does), or {-errno} when the fork failed; later {exit code} once the server reaped
 *    the child, and then the server closes it.
 * The caller's side is _core.forkserver_spawn (here); from the reply on, the child is a
 * record of process.c's child list (luamp_child_push_remote), which keeps the pidfd as
 * the Process sentinel, signals through it (pidfd_send_signal: never a reused pid) and
 * reads the exit code from the status socket. A worker (LUAMP_FORK_WORKER) leads its process
 * group; the server, its reaper, SIGKILLs the group before reaping it, as process.c does
 * for forked workers.
 *
 * Lifetimes: the server dies with its creator (PR_SET_PDEATHSIG, and EOF on the control
 * socket, which only the creator holds: a fork of the creator drops its copy at once).
 * Its daemon children die with it (their parent-death signal is the server's death),
 * workers too (their SIGTERM kills their group), the others live on as with fork. A
 * server that died under its caller is restarted by the next request. The server
 * ignores SIGINT (Ctrl-C is for the caller); its children get the default back.
 */
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

extern char **environ;

#define REQUEST_MAGIC "LFSQ"
#define SERVER_FD 3
#define REPLY_WAIT_MS 30000     /* the server answers in microseconds; this is a stuck one */

typedef struct {
  char magic[4];
  int32_t kind;
} request;

/* ---- packets with descriptors ----------------------------------------------------------- */

static ssize_t send_packet(int fd, const void *p, size_t n, const int *fds, int nfds) {
  union { char buf[CMSG_SPACE(sizeof(int) * 2)]; struct cmsghdr align; } u;
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
  ssize_t w;
  do w = sendmsg(fd, &mh, MSG_NOSIGNAL); while (w < 0 && errno == EINTR);
  return w;
}

/* One packet into p (at most n bytes) and up to 2 descriptors (close-on-exec) into fds;
 * returns its length (-1: error, 0: EOF) and sets *nfds. A packet that was cut (too long,
 * too many descriptors) comes back as -1 with EPROTO, its descriptors closed. */
static ssize_t recv_packet(int fd, void *p, size_t n, int *fds, int *nfds, int flags) {
  union { char buf[CMSG_SPACE(sizeof(int) * 2)]; struct cmsghdr align; } u;
  struct iovec iov = {.iov_base = p, .iov_len = n};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                      .msg_controllen = sizeof u.buf};
  ssize_t r;
  do r = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC | flags); while (r < 0 && errno == EINTR);
  *nfds = 0;
  if (r < 0) return r;
  for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
    if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
    size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < k; i++) {
      int d;
      memcpy(&d, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
      if (*nfds < 2) fds[(*nfds)++] = d;
      else luamp_close_fd(d);
    }
  }
  if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
    for (int i = 0; i < *nfds; i++) luamp_close_fd(fds[i]);
    *nfds = 0;
    errno = EPROTO;
    return -1;
  }
  return r;
}

/* ---- the server ------------------------------------------------------------------------- */

typedef struct {
  pid_t pid;
  int pidfd;
  int status_fd;          /* the server's end of the caller's status socket */
  int group;              /* a worker: its group is killed when it is reaped */
} served;

static served *kids;
static int nkids, capkids;

static void reply(int status_fd, int32_t value, int pidfd) {
  send_packet(status_fd, &value, sizeof value, &pidfd, pidfd >= 0 ? 1 : 0);
}

/* The child is gone (its pidfd is readable): reap it, its group first for a worker. */
static void reap_kid(int i) {
  served *k = &kids[i];
  if (k->group) {
    siginfo_t si;
    int r;
    do r = waitid(P_PID, (id_t)k->pid, &si, WEXITED | WNOWAIT); while (r < 0 && errno == EINTR);
    if (r == 0) kill(-k->pid, SIGKILL);
  }
  int status = 0;
  pid_t r;
  do r = waitpid(k->pid, &status, 0); while (r < 0 && errno == EINTR);
  int32_t code = r < 0 ? 255 : WIFEXITED(status) ? WEXITSTATUS(status)
               : WIFSIGNALED(status) ? -WTERMSIG(status) : 255;
  reply(k->status_fd, code, -1);
  luamp_close_fd(k->status_fd);
  luamp_close_fd(k->pidfd);
  kids[i] = kids[--nkids];
}

/* In the new child: none of the server's descriptors are its business. */
static void leave_server(int ctl) {
  luamp_close_fd(ctl);
  for (int i = 0; i < nkids; i++) {
    luamp_close_fd(kids[i].pidfd);
    luamp_close_fd(kids[i].status_fd);
  }
  free(kids);
  kids = NULL;
  nkids = capkids = 0;
}

static int (*run_start)(lua_State *L, int fd, int fresh);   /* spawn.c's */

static void serve_request(lua_State *L, int ctl, int kind, int child_fd, int status_fd) {
  if (nkids == capkids) {
    int cap = capkids ? capkids * 2 : 16;
    served *grown = realloc(kids, sizeof *kids * (size_t)cap);
    if (!grown) {
      reply(status_fd, -ENOMEM, -1);
      luamp_close_fd(status_fd);
      luamp_close_fd(child_fd);
      return;
    }
    kids = grown;
    capkids = cap;
  }
  pid_t pid = luamp_fork(kind);
  if (pid == 0) {
    luamp_forkserver_child = 1;
    leave_server(ctl);
    luamp_close_fd(status_fd);
    /* a worker's fork made it ignore SIGINT (the pool stops it); others get Ctrl-C back */
    if (kind != LUAMP_FORK_WORKER) signal(SIGINT, SIG_DFL);
    luamp_child_exit(run_start(L, child_fd, 0));
  }
  int err = errno;
  luamp_close_fd(child_fd);
  if (pid < 0) {
    reply(status_fd, -err, -1);
    luamp_close_fd(status_fd);
    return;
  }
  int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
  if (pidfd < 0) {
    err = errno;
    kill(pid, SIGKILL);
    if (kind == LUAMP_FORK_WORKER) kill(-pid, SIGKILL);
    pid_t r;
    do r = waitpid(pid, NULL, 0); while (r < 0 && errno == EINTR);
    reply(status_fd, -err, -1);
    luamp_close_fd(status_fd);
    return;
  }
  if (kind == LUAMP_FORK_WORKER) setpgid(pid, pid);   /* as the child does: no race */
  kids[nkids++] = (served){.pid = pid, .pidfd = pidfd, .status_fd = status_fd,
                           .group = kind == LUAMP_FORK_WORKER};
  reply(status_fd, (int32_t)pid, pidfd);
}

/* One packet on the control socket: a request, or EOF (returns 0: the creator is gone).
 * Anything malformed is dropped with its descriptors. */
static int serve_control(lua_State *L, int ctl) {
  request rq;
  int fds[2], nfds;
  ssize_t r = recv_packet(ctl, &rq, sizeof rq, fds, &nfds, 0);
  if (r == 0) return 0;
  if (r < 0) return errno == EPROTO || errno == EAGAIN;
  if (r != (ssize_t)sizeof rq || memcmp(rq.magic, REQUEST_MAGIC, 4) != 0 || nfds != 2 ||
      (rq.kind != LUAMP_FORK_PLAIN && rq.kind != LUAMP_FORK_DAEMON && rq.kind != LUAMP_FORK_WORKER)) {
    for (int i = 0; i < nfds; i++) luamp_close_fd(fds[i]);
    return 1;
  }
  serve_request(L, ctl, rq.kind, fds[0], fds[1]);
  return 1;
}

_Noreturn void luamp_forkserver_main(lua_State *L, int ctl, pid_t creator,
                                     int (*run)(lua_State *L, int fd, int fresh)) {
  /* dies with its creator; if that already happened (before prctl), go now */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != creator) _exit(0);
  signal(SIGINT, SIG_IGN);
  fcntl(ctl, F_SETFD, FD_CLOEXEC);
  run_start = run;
  /* every part of luamp, compiled once here rather than in each child (luamp.main loads
   * them on first use) */
  lua_getglobal(L, "luamp");
  lua_getfield(L, -1, "_load_all");
  if (lua_pcall(L, 0, 0, 0) != LUA_OK) _exit(1);
  lua_pop(L, 1);
  /* its children leave as forked children do, through os.exit too: closing the state
   * would touch (and so copy) every page of the server's heap */
  luamp_install_child_os_exit(L);
  struct pollfd *pfd = NULL;
  int cap = 0;
  for (;;) {
    if (cap < nkids + 1) {
      int want = (nkids + 1) * 2;
      struct pollfd *grown = realloc(pfd, sizeof *pfd * (size_t)want);
      if (!grown) _exit(1);
      pfd = grown;
      cap = want;
    }
    pfd[0] = (struct pollfd){.fd = ctl, .events = POLLIN};
    for (int i = 0; i < nkids; i++) pfd[i + 1] = (struct pollfd){.fd = kids[i].pidfd, .events = POLLIN};
    int n = nkids + 1;
    int r = poll(pfd, (nfds_t)n, -1);
    if (r < 0) {
      if (errno == EINTR) continue;
      _exit(1);
    }
    /* the ended children first (from the back: reaping moves the last into the hole) */
    for (int i = n - 1; i >= 1; i--)
      if (pfd[i].revents) reap_kid(i - 1);
    if (pfd[0].revents && !serve_control(L, ctl)) break;
  }
  /* the creator is gone: the children that live on are init's now */
  _exit(0);
}

/* ---- the caller's side ------------------------------------------------------------------- */

static int ctl_fd = -1;
static pid_t ctl_owner;          /* the process that started the server */
static pid_t server_pid;

/* A forked child of the caller neither uses nor keeps its parent's server: holding the
 * control socket would keep the server alive after its creator. A fork hook (base.h),
 * so it runs in every luamp fork; after a raw fork the child keeps the socket open but
 * never uses it (ctl_owner is not its pid). */
static void forget_server(void) {
  /* (written only when set: in a child every page written is a page copied) */
  if (ctl_fd >= 0) {
    close(ctl_fd);
    ctl_fd = -1;
  }
  if (server_pid) server_pid = 0;
}

/* Reaps a server that went away (its control socket broke). */
static void bury_server(void) {
  if (ctl_fd >= 0) luamp_close_fd(ctl_fd);
  ctl_fd = -1;
  if (server_pid > 0) {
    kill(server_pid, SIGKILL);
    pid_t r;
    do r = waitpid(server_pid, NULL, 0); while (r < 0 && errno == EINTR);
  }
  server_pid = 0;
}

static int start_server(const char *exe) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) return errno;
  if (sv[1] == SERVER_FD) {    /* adddup2 onto itself would keep FD_CLOEXEC */
    int moved = fcntl(sv[1], F_DUPFD_CLOEXEC, SERVER_FD + 1);
    int err = errno;
    luamp_close_fd(sv[1]);
    if (moved < 0) {
      luamp_close_fd(sv[0]);
      return err;
    }
    sv[1] = moved;
  }
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  int rc = posix_spawn_file_actions_init(&fa);
  if (rc) goto out_fds;
  rc = posix_spawnattr_init(&at);
  if (rc) {
    posix_spawn_file_actions_destroy(&fa);
    goto out_fds;
  }
  rc = posix_spawn_file_actions_adddup2(&fa, sv[1], SERVER_FD);
  if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&fa, SERVER_FD + 1);
  sigset_t none, dfl;
  sigemptyset(&none);
  sigemptyset(&dfl);
  luamp_spawn_sigdefault(&dfl);
  if (rc == 0) rc = posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  if (rc == 0) rc = posix_spawnattr_setsigmask(&at, &none);
  if (rc == 0) rc = posix_spawnattr_setsigdefault(&at, &dfl);
  char fdarg[16], creator[24];
  snprintf(fdarg, sizeof fdarg, "%d", SERVER_FD);
  snprintf(creator, sizeof creator, "%d", (int)luamp_self_pid());
  char *argv[] = {(char *)exe, (char *)LUAMP_FORKSERVER_ARG, fdarg, creator, NULL};
  pid_t pid;
  fflush(NULL);
  if (rc == 0) rc = posix_spawn(&pid, exe, &fa, &at, argv, environ);
  posix_spawnattr_destroy(&at);
  posix_spawn_file_actions_destroy(&fa);
  if (rc) goto out_fds;
  luamp_close_fd(sv[1]);
  ctl_fd = sv[0];
  ctl_owner = luamp_self_pid();
  server_pid = pid;
  return 0;
out_fds:
  luamp_close_fd(sv[0]);
  luamp_close_fd(sv[1]);
  return rc;
}

/* Asks the server (started on first use from exe) for a child of kind LUAMP_FORK_* whose
 * start descriptor is child_fd; returns the status socket or -errno. */
static int ask_server(const char *exe, int kind, int child_fd) {
  if (ctl_fd >= 0 && ctl_owner != luamp_self_pid()) forget_server();
  int st[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, st) < 0) return -errno;
  request rq;
  memcpy(rq.magic, REQUEST_MAGIC, 4);
  rq.kind = kind;
  int fds[2] = {child_fd, st[1]};
  for (int attempt = 0; attempt < 2; attempt++) {
    if (ctl_fd < 0) {
      int rc = start_server(exe);
      if (rc) {
        luamp_close_fd(st[0]);
        luamp_close_fd(st[1]);
        return -rc;
      }
    }
    if (send_packet(ctl_fd, &rq, sizeof rq, fds, 2) == (ssize_t)sizeof rq) {
      luamp_close_fd(st[1]);
      return st[0];
    }
    int err = errno;
    if (err != EPIPE && err != ECONNRESET && err != ENOTCONN) {
      luamp_close_fd(st[0]);
      luamp_close_fd(st[1]);
      return -err;
    }
    bury_server();      /* it died (killed?): one new server, once */
  }
  luamp_close_fd(st[0]);
  luamp_close_fd(st[1]);
  return -EPIPE;
}

/* The reply to a request: 0 with the pid and a pidfd, or an errno (status_fd is then
 * closed). */
static int await_reply(int status_fd, pid_t *pid, int *pidfd) {
  struct pollfd p = {.fd = status_fd, .events = POLLIN};
  int r;
  do r = poll(&p, 1, REPLY_WAIT_MS); while (r < 0 && errno == EINTR);
  int32_t v = 0;
  int fds[2], nfds = 0;
  ssize_t n = r > 0 ? recv_packet(status_fd, &v, sizeof v, fds, &nfds, MSG_DONTWAIT) : -1;
  int err = r == 0 ? ETIMEDOUT : n == 0 ? EPIPE : n < 0 ? errno : 0;
  if (!err && (n != (ssize_t)sizeof v || (v > 0 && nfds != 1) || v == 0)) err = EPROTO;
  if (!err && v < 0) err = -v > 0 && -v < 4096 ? -v : EPROTO;
  if (err) {
    for (int i = 0; i < nfds; i++) luamp_close_fd(fds[i]);
    luamp_close_fd(status_fd);
    /* no reply because the server died (killed): the next request starts another */
    struct pollfd c = {.fd = ctl_fd, .events = 0};
    if (err == EPIPE && ctl_fd >= 0 && poll(&c, 1, 0) > 0 && (c.revents & (POLLHUP | POLLERR)))
      bury_server();
    return err;
  }
  *pid = (pid_t)v;
  *pidfd = fds[0];
  return 0;
}

/* _core.forkserver_spawn(message, daemon, fds) -> Child handle: has the server fork a
 * child and sends it the start message (process.lua's spawn message), as _core.spawn
 * does for a spawn child. The request goes first, then the frame (the child reads it as
 * soon as it exists), then the reply is awaited. */
static int l_forkserver_spawn(lua_State *L) {
  size_t len;
  const char *msg = luaL_checklstring(L, 1, &len);
  int kind = lua_type(L, 2) == LUA_TSTRING && strcmp(lua_tostring(L, 2), "worker") == 0
           ? LUAMP_FORK_WORKER : lua_toboolean(L, 2) ? LUAMP_FORK_DAEMON : LUAMP_FORK_PLAIN;
  luamp_fdlist *fds = luamp_fds_check_bundle(L, 3);
  if (luamp_is_daemon()) luamp_raise(L, "Value", "daemonic processes are not allowed to have children");
  const char *exe = luamp_spawn_executable();
  if (!exe) luamp_raise(L, "Value", "cannot start a process: no luamp executable is known (luamp.set_executable)");
  if (len > LUAMP_SPAWN_MAX) luamp_raise(L, "Value", "cannot start a process: the target and args are too large");
  luamp_reap_ended();
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
    luamp_raise_errno(L, "Value", "cannot start a process", errno);
  int st = ask_server(exe, kind, sv[1]);
  luamp_close_fd(sv[1]);
  int rc = st < 0 ? -st : 0;
  pid_t pid = 0;
  int pidfd = -1;
  if (rc == 0) {
    luamp_spawn_send_frame(sv[0], msg, len, fds);
    rc = await_reply(st, &pid, &pidfd);
  }
  luamp_close_fd(sv[0]);
  if (rc != 0) {
    lua_pushfstring(L, "cannot start a process: %s (forkserver)", exe);
    luamp_raise_errno(L, "Value", lua_tostring(L, -1), rc);
  }
  luamp_child_push_remote(L, pid, pidfd, st, kind);
  return 1;
}

int luamp_open_forkserver(lua_State *L) {
  luamp_atfork(NULL, NULL, forget_server);
  lua_pushcfunction(L, l_forkserver_spawn);
  lua_setfield(L, -2, "forkserver_spawn");
  return 0;
}
