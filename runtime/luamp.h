/*
 * luamp.h — the public C interface of luamp, for hosts that embed it.
 *
 * A host opens the module like any Lua library:
 *     luaL_requiref(L, "luamp", luaopen_luamp, 0);
 * luamp installs no process-wide signal handler behind the host's back and reaps only
 * the children it started itself.
 */
#ifndef LUAMP_H
#define LUAMP_H

#include <lua.h>

#define LUAMP_VERSION "0.1.0"

struct uv_loop_s;

/* Opens the module: returns 1 value, the luamp table. */
int luaopen_luamp(lua_State *L);

/* Shares the host's libuv loop with luamp instead of luamp's own (call before opening). */
void luamp_set_loop(struct uv_loop_s *loop);

/* The program that re-enters luamp in a fresh process (spawn start method). Defaults to
 * the running executable when that is the luamp host. The string is copied. */
void luamp_set_executable(const char *path);

/* Runs the interactive read-eval-print loop on L (which must have luamp opened) until
 * end of input. Returns 0 on a normal end. */
int luamp_repl(lua_State *L);

#endif
