/*
 * spawn.c — the child's side of the spawn start method, and where the executable is.
 *
 * luamp_child_main(argc, argv) is called first thing in a host's main. In a process
 * started as a spawn child (argv[1] is LUAMP_SPAWN_ARG; see internal.h for the frame) it
 * reads the start message from its start descriptor, runs it in a fresh Lua state with
 * the standard libraries and luamp opened, and exits; in a forkserver (argv[1] is
 * LUAMP_FORKSERVER_ARG) it serves (forkserver.c) and exits; otherwise it returns at once.
 * spawn_run is the reading and running, which the forkserver's children share (it is
 * handed to the server): they run their start message in the server's opened state.
 *
 * Everything on the descriptor is untrusted until checked: the magic and the length are
 * validated before anything is allocated, the whole message must arrive, and it is
 * handed to process.lua (_spawn_main), which decodes its plain-data shell untrusted and
 * only then the body (functions, modules by name) trusted. Garbage makes the child exit
 * with status 2 and a message on stderr; none of it is run.
 *
 * luamp_spawn_executable() (base.c, with the executable a host sets) finds the program a
 * spawn child runs. This file is an entry point, like the host's main: it opens luamp
 * (module.c) in the new state, so it sits in the top layer and nothing calls into it.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sys/socket.h>

#include <lualib.h>

#include "internal.h"
#include "luamp.h"

#define EXIT_BAD_START 2

static _Noreturn void bad_start(const char *why) {
  fprintf(stderr, "luamp: spawn child: %s\n", why);
  fflush(stderr);
  _exit(EXIT_BAD_START);
}

/* Reads exactly n bytes; 0 on success, -1 at end of input or error. */
static int read_all(int fd, char *p, size_t n) {
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

/* argv[2]: the start descriptor, a small decimal number (argv[3] of a forkserver: its
 * creator's pid) */
static int parse_fd(const char *s) {
  if (!s || !*s || strlen(s) > 9) return -1;
  int fd = 0;
  for (const char *p = s; *p; p++) {
    if (*p < '0' || *p > '9') return -1;
    fd = fd * 10 + (*p - '0');
  }
  return fd;
}

/* The header's first bytes with the descriptors that came on them (into fds, close-on-
 * exec); then the rest of the header. A truncated descriptor list is refused. */
static void read_head(int fd, unsigned char *head, size_t n, luamp_fdlist *fds) {
  union { char buf[CMSG_SPACE(sizeof(int) * LUAMP_MAX_FDS)]; struct cmsghdr align; } u;
  struct iovec iov = {.iov_base = head, .iov_len = n};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                      .msg_controllen = sizeof u.buf};
  ssize_t r;
  do r = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC); while (r < 0 && errno == EINTR);
  fds->n = 0;
  if (r < 0 && errno == ENOTSOCK) {       /* a file or pipe (by hand, tests): no descriptors */
    do r = read(fd, head, n); while (r < 0 && errno == EINTR);
    mh.msg_controllen = 0;
    mh.msg_flags = 0;
  }
  for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); r > 0 && cm; cm = CMSG_NXTHDR(&mh, cm)) {
    if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
    size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < k && fds->n < LUAMP_MAX_FDS; i++)
      memcpy(&fds->fd[fds->n++], CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
  }
  if (r <= 0) bad_start("no start message");
  if (mh.msg_flags & MSG_CTRUNC) bad_start("too many descriptors with the start message");
  if (read_all(fd, (char *)head + r, n - (size_t)r) < 0) bad_start("no start message");
}

static int traceback(lua_State *L) {
  luaL_traceback(L, L, luaL_tolstring(L, 1, NULL), 1);
  return 1;
}

/* In protected mode: opens the libraries (in a fresh state) and runs process.lua's
 * _spawn_main(message). */
static int run_child(lua_State *L) {
  size_t len = (size_t)lua_tointeger(L, 1);
  char *msg = lua_touserdata(L, 2);
  luamp_fdlist *fds = lua_touserdata(L, 3);
  if (lua_toboolean(L, 4)) {
    luaL_openlibs(L);
    luaL_requiref(L, "luamp", luaopen_luamp, 1);
    lua_pop(L, 1);
  }
  lua_getglobal(L, "require");
  lua_pushliteral(L, "luamp.process");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "_spawn_main");
  lua_pushlstring(L, msg, len);
  if (fds->n > 0) {                 /* the bundle owns them from here */
    luamp_fdlist *b = luamp_fds_push_bundle(L);
    *b = *fds;
    fds->n = 0;
  } else {
    lua_pushnil(L);
  }
  lua_call(L, 2, 1);
  return 1;
}

/* Reads the start frame on fd and runs its message in L (fresh: a new state, whose
 * libraries are opened first); returns the exit code. Garbage exits the process (2). */
static int spawn_run(lua_State *L, int fd, int fresh) {
  unsigned char head[LUAMP_SPAWN_HEADER];
  static luamp_fdlist fds;
  read_head(fd, head, sizeof head, &fds);
  if (memcmp(head, LUAMP_SPAWN_MAGIC, 8) != 0) bad_start("not a start message (bad magic)");
  uint64_t len = 0;
  for (int i = 7; i >= 0; i--) len = (len << 8) | head[8 + i];
  if (len == 0 || len > LUAMP_SPAWN_MAX) bad_start("start message length out of range");
  char *msg = malloc((size_t)len);
  if (!msg) bad_start("out of memory");
  if (read_all(fd, msg, (size_t)len) < 0) bad_start("start message truncated");
  close(fd);
  lua_pushcfunction(L, traceback);
  lua_pushcfunction(L, run_child);
  lua_pushinteger(L, (lua_Integer)len);
  lua_pushlightuserdata(L, msg);
  lua_pushlightuserdata(L, &fds);
  lua_pushboolean(L, fresh);
  int rc;
  if (lua_pcall(L, 4, 1, -6) != LUA_OK) {
    fprintf(stderr, "luamp: spawn child: %s\n", lua_tostring(L, -1));
    rc = 1;
  } else {
    rc = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 0;
  }
  lua_pop(L, 2);
  free(msg);
  return rc;
}

void luamp_child_main(int argc, char **argv) {
  if (argc < 3 || !argv || !argv[1]) return;
  int server = strcmp(argv[1], LUAMP_FORKSERVER_ARG) == 0;
  if (!server && strcmp(argv[1], LUAMP_SPAWN_ARG) != 0) return;
  int fd = parse_fd(argv[2]);
  if (fd < 0) bad_start("bad start descriptor argument");
  luamp_spawned = 1;
  if (!luamp_executable()) {
    char path[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", path, sizeof path - 1);
    if (n > 0) {
      path[n] = '\0';
      luamp_set_executable(path);
    }
  }
  if (server) {
    int creator = argc > 3 ? parse_fd(argv[3]) : -1;
    if (creator <= 0) bad_start("bad forkserver creator argument");
    /* the server's state, opened here so that forkserver.c calls nothing above it */
    lua_State *L = luaL_newstate();
    if (!L) bad_start("cannot create a Lua state");
    luaL_openlibs(L);
    luaL_requiref(L, "luamp", luaopen_luamp, 1);
    lua_pop(L, 1);
    luamp_forkserver_main(L, fd, (pid_t)creator, spawn_run);
  }
  lua_State *L = luaL_newstate();
  if (!L) bad_start("cannot create a Lua state");
  int rc = spawn_run(L, fd, 1);
  fflush(NULL);
  lua_close(L);          /* joins (or terminates) the child's own children */
  exit(rc & 0xff);
}
