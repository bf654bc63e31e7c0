/* test_conn_pingpong.c — a Connection used for request and answer waits before its
 * receive instead of after a receive that finds the socket empty: in a ping-pong of N
 * messages the parent's recvmsg calls that fail with EAGAIN stay a small fraction of N
 * (they were one per message). A Ctrl-C pending while a message is already there wins
 * in this mode as in any other, and the message stays for the next receive (see
 * test_interrupt_items.c). This program's recvmsg() stands in for libc's
 * (the runtime is linked in statically) and counts the calls that found nothing. */
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <lualib.h>

#include "internal.h"
#include "luamp.h"

static int empty_recvs;

ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
  static ssize_t (*real)(int, struct msghdr *, int);
  if (!real) real = (ssize_t (*)(int, struct msghdr *, int))dlsym(RTLD_NEXT, "recvmsg");
  ssize_t n = real(fd, msg, flags);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) empty_recvs++;
  return n;
}

static int l_empty_recvs(lua_State *L) {
  lua_pushinteger(L, empty_recvs);
  return 1;
}

static int l_interrupt(lua_State *L) {
  (void)L;
  luamp_request_interrupt();
  return 0;
}

static int l_take_interrupt(lua_State *L) {
  lua_pushboolean(L, luamp_take_interrupt());
  return 1;
}

static const char *script =
  "local n = 400\n"
  "local a, b = luamp.Pipe()\n"
  "local sent = luamp.Event()\n"
  "local p = luamp.Process{target = function()\n"
  "  for _ = 1, n do a:send(a:recv() + 1) end\n"
  "  a:send('unasked'); sent:set()\n"
  "end}\n"
  "p:start()\n"
  "local v = 0\n"
  "local before = empty_recvs()\n"
  "for _ = 1, n do b:send(v); v = b:recv() end\n"
  "assert(v == n, 'wrong answer ' .. tostring(v))\n"
  "local empty = empty_recvs() - before\n"
  "assert(empty <= n // 4, ('%d of %d receives found the socket empty first'):format(empty, n))\n"
  "sent:wait()\n"
  "interrupt()\n"
  "local ok, m = pcall(b.recv, b)\n"
  "assert(not ok and m.kind == 'Interrupted', 'a pending Ctrl-C lost to a message already there: ' .. tostring(m))\n"
  "assert(not take_interrupt(), 'the Ctrl-C is still pending after Interrupted')\n"
  "assert(b:recv() == 'unasked', 'the message did not stay')\n"
  "p:join()\n"
  "return empty\n";

int main(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  lua_register(L, "empty_recvs", l_empty_recvs);
  lua_register(L, "interrupt", l_interrupt);
  lua_register(L, "take_interrupt", l_take_interrupt);
  int failures = 0;
  if (luaL_dostring(L, script) != LUA_OK) {
    fprintf(stderr, "test_conn_pingpong: %s\n", luaL_tolstring(L, -1, NULL));
    failures++;
  } else {
    printf("test_conn_pingpong: ok (%d empty receives in 400 round trips)\n", (int)lua_tointeger(L, -1));
  }
  lua_close(L);
  return failures ? 1 : 0;
}
