/*
 * pool.c — the few system calls the Pool (lua/luamp/pool.lua) needs that no other
 * concept owns: whether stderr is a terminal (the progress line is drawn only then) and
 * the worker's setup (workers ignore SIGINT: Ctrl-C reaches the whole foreground
 * process group, and only the parent should act on it — it terminates the pool) — plus
 * two table helpers for the hot path: Lua cannot make a table of a known size, and
 * growing a table of a million results one doubling at a time costs more than the work.
 */
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include "internal.h"

/* isatty(fd) -> boolean */
static int l_isatty(lua_State *L) {
  lua_Integer fd = luaL_checkinteger(L, 1);
  lua_pushboolean(L, fd >= 0 && fd <= INT32_MAX && isatty((int)fd));
  return 1;
}

/* worker_setup(): SIGINT ignored, and a Ctrl-C that reached this process between fork
 * and now is forgotten. Freed memory is kept rather than handed back to the kernel: a
 * worker reuses its chunk buffers over and over, and faulting fresh pages in costs more
 * than the work on many virtual machines. */
static int l_worker_setup(lua_State *L) {
  (void)L;
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  struct sigaction sa = {.sa_handler = SIG_IGN};
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  luamp_take_interrupt();
  return 0;
}

/* table_new(narr) -> a table with room for narr array items */
static int l_table_new(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  if (n < 0 || n > (1 << 26)) n = 0;   /* a hint only: beyond this, let it grow */
  lua_createtable(L, (int)n, 1);
  return 1;
}

/* table_slice(t, i, j, [dst, dst_n]) -> {t[i], ..., t[j]} (holes kept as holes), sized up
 * front; or refills dst (whose items 1..dst_n are cleared first where not overwritten),
 * so that the chunks of a big map reuse one table instead of faulting in fresh memory. */
static int l_table_slice(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Integer i = luaL_checkinteger(L, 2), j = luaL_checkinteger(L, 3);
  if (i < 1 || j < i - 1 || j - i >= INT32_MAX) luamp_raise(L, "Value", "table_slice: bad range");
  lua_Integer n = j - i + 1;
  if (lua_istable(L, 4)) {
    lua_Integer old = luaL_optinteger(L, 5, 0);
    lua_settop(L, 4);
    for (lua_Integer k = n + 1; k <= old; k++) {
      lua_pushnil(L);
      lua_rawseti(L, 4, k);
    }
  } else {
    lua_settop(L, 3);
    lua_createtable(L, n > (1 << 26) ? 0 : (int)n, 0);
  }
  for (lua_Integer k = i; k <= j; k++) {
    lua_geti(L, 1, k);
    lua_rawseti(L, -2, k - i + 1);
  }
  return 1;
}

int luamp_open_pool(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"isatty", l_isatty},
    {"worker_setup", l_worker_setup},
    {"table_new", l_table_new},
    {"table_slice", l_table_slice},
    {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return luamp_open_ring(L);
}
