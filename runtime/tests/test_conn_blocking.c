/* test_conn_blocking.c — a Connection's receive outside any task, with no pump and no
 * deadline, blocks in recvmsg itself (and a manager proxy call waits for its reply in
 * recv, with no poll first): in a ping-pong of N messages the parent makes N
 * recvmsg calls and (almost) no poll calls, one system call per message as a plain
 * blocking read. Ctrl-C still wins: an embedder's SIGINT handler installed with
 * SA_RESTART (which the kernel would otherwise restart a blocking recvmsg after) ends a
 * receive blocked in the kernel with Interrupted, and the connection goes on. This
 * program's recvmsg() and poll() stand in for libc's (the runtime is linked in
 * statically) and count the calls. */
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <lualib.h>

#include "internal.h"
#include "luamp.h"

static long recvmsgs, polls;

ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
  static ssize_t (*real)(int, struct msghdr *, int);
  if (!real) real = (ssize_t (*)(int, struct msghdr *, int))dlsym(RTLD_NEXT, "recvmsg");
  recvmsgs++;
  return real(fd, msg, flags);
}

int poll(struct pollfd *fds, nfds_t n, int ms) {
  static int (*real)(struct pollfd *, nfds_t, int);
  if (!real) real = (int (*)(struct pollfd *, nfds_t, int))dlsym(RTLD_NEXT, "poll");
  polls++;
  return real(fds, n, ms);
}

static int l_counts(lua_State *L) {
  lua_pushinteger(L, recvmsgs);
  lua_pushinteger(L, polls);
  return 2;
}

/* An embedder's handler: it only marks the interrupt, and asks for restarted calls. */
static void on_sigint(int sig) {
  (void)sig;
  luamp_request_interrupt();
}

static int l_catch_sigint_restarting(lua_State *L) {
  (void)L;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigint;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  return 0;
}

/* sigint_when_asleep(pid): waits until pid sleeps (state S in /proc/pid/stat: the
 * parent blocked in its receive), then sends it SIGINT. */
static int l_sigint_when_asleep(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  for (int i = 0; i < 100000; i++) {
    FILE *f = fopen(path, "re");
    char buf[512] = {0};
    if (f) {
      size_t n = fread(buf, 1, sizeof buf - 1, f);
      fclose(f);
      buf[n] = 0;
    }
    const char *p = strrchr(buf, ')');
    if (p && p[1] == ' ' && p[2] == 'S') break;
    usleep(200);
  }
  kill(pid, SIGINT);
  return 0;
}

static const char *script =
  "local n = 400\n"
  "local a, b = luamp.Pipe()\n"
  "local p = luamp.Process{target = function()\n"
  "  for _ = 1, n do a:send(a:recv() + 1) end\n"
  "end}\n"
  "p:start()\n"
  "local v = 0\n"
  "local r0, p0 = counts()\n"
  "for _ = 1, n do b:send(v); v = b:recv() end\n"
  "local r1, p1 = counts()\n"
  "assert(v == n, 'wrong answer ' .. tostring(v))\n"
  "assert(r1 - r0 <= n + n // 16, ('%d recvmsg calls for %d messages'):format(r1 - r0, n))\n"
  "assert(p1 - p0 <= n // 16, ('%d poll calls for %d messages'):format(p1 - p0, n))\n"
  "p:join()\n"
  "-- Ctrl-C in a receive blocked in the kernel, under a restarting handler\n"
  "local parent = luamp.getpid()\n"
  "local q = luamp.Process{target = function()\n"
  "  sigint_when_asleep(parent)\n"
  "  -- the parent answers once interrupted; a receive that went on waiting gets 'late'\n"
  "  if a:poll(5) then a:recv(); a:send('after') else a:send('late') end\n"
  "end}\n"
  "q:start()\n"
  "catch_sigint_restarting()\n"
  "local t0 = luamp.time()\n"
  "local ok, e = pcall(b.recv, b)\n"
  "local dt = luamp.time() - t0\n"
  "assert(not ok and type(e) == 'table' and e.kind == 'Interrupted', 'the receive was not interrupted: ' .. tostring(e))\n"
  "assert(dt < 3, ('Ctrl-C took %.2f s to end the receive'):format(dt))\n"
  "b:send('go')\n"
  "local m = b:recv()\n"
  "assert(m == 'after', 'the connection did not go on: ' .. tostring(m))\n"
  "q:join()\n"
  "-- a manager call waits for its reply in recv too, and Ctrl-C wins there as well\n"
  "local m = luamp.Manager()\n"
  "local d, mq = m:dict(), m:Queue()\n"
  "d.k = 0\n"
  "local mr0, mp0 = counts()\n"
  "for i = 1, 200 do d.k = i end\n"
  "local mr1, mp1 = counts()\n"
  "assert(d.k == 200)\n"
  "assert(mp1 - mp0 <= 200 // 16, ('%d poll calls for 200 manager calls'):format(mp1 - mp0))\n"
  "local k = luamp.Process{target = function()\n"
  "  sigint_when_asleep(parent)\n"
  "  if not a:poll(5) then mq:put('late') end\n"
  "end}\n"
  "k:start()\n"
  "local ok2, e2 = pcall(mq.get, mq)\n"
  "assert(not ok2 and type(e2) == 'table' and e2.kind == 'Interrupted', 'the manager call was not interrupted: ' .. tostring(e2))\n"
  "b:send('done')\n"
  "k:join()\n"
  "m:shutdown()\n"
  "return r1 - r0, p1 - p0\n";

int main(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  lua_register(L, "counts", l_counts);
  lua_register(L, "catch_sigint_restarting", l_catch_sigint_restarting);
  lua_register(L, "sigint_when_asleep", l_sigint_when_asleep);
  int failures = 0;
  if (luaL_dostring(L, script) != LUA_OK) {
    fprintf(stderr, "test_conn_blocking: %s\n", luaL_tolstring(L, -1, NULL));
    failures++;
  } else {
    printf("test_conn_blocking: %lld recvmsg and %lld poll calls for 400 messages\n",
           (long long)lua_tointeger(L, -2), (long long)lua_tointeger(L, -1));
  }
  lua_close(L);
  if (failures) return 1;
  printf("test_conn_blocking: ok\n");
  return 0;
}
