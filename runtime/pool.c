/*
 * pool.c — the few system calls the Pool (lua/luamp/pool.lua) needs that no other
 * concept owns: whether stderr is a terminal (the progress line is drawn only then) and
 * the worker's signal setup (workers ignore SIGINT: Ctrl-C reaches the whole foreground
 * process group, and only the parent should act on it — it terminates the pool).
 */
#include <signal.h>
#include <unistd.h>

#include "internal.h"

/* isatty(fd) -> boolean */
static int l_isatty(lua_State *L) {
  lua_Integer fd = luaL_checkinteger(L, 1);
  lua_pushboolean(L, fd >= 0 && fd <= INT32_MAX && isatty((int)fd));
  return 1;
}

/* worker_signals(): SIGINT ignored, and a Ctrl-C that reached this process between fork
 * and now is forgotten. */
static int l_worker_signals(lua_State *L) {
  (void)L;
  struct sigaction sa = {.sa_handler = SIG_IGN};
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  luamp_take_interrupt();
  return 0;
}

int luamp_open_pool(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"isatty", l_isatty},
    {"worker_signals", l_worker_signals},
    {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return 0;
}
