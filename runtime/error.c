/*
 * error.c — luamp's error objects.
 *
 * Every error luamp raises is a table {kind = <Kind>, message = <text>, ...} sharing one
 * metatable (registry "luamp.Error") whose __tostring renders "luamp.<Kind>: <message>",
 * so that uncaught errors print readably in any host. Lua code raises them through
 * `_core.raise(kind, message, [fields], [level])` and C through luamp_raise().
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

#define ERROR_MT "luamp.Error"

static const char *const error_kinds[] = {
#define KIND_NAME(k) #k,
  LUAMP_ERROR_KINDS(KIND_NAME)
#undef KIND_NAME
  NULL
};

static int error_tostring(lua_State *L) {
  lua_getfield(L, 1, "kind");
  lua_getfield(L, 1, "message");
  lua_pushfstring(L, "luamp.%s: %s", luaL_optstring(L, -2, "?"), luaL_optstring(L, -1, ""));
  return 1;
}

static void push_error_table(lua_State *L, const char *kind, const char *msg) {
  lua_createtable(L, 0, 4);
  lua_pushstring(L, kind);
  lua_setfield(L, -2, "kind");
  lua_pushstring(L, msg);
  lua_setfield(L, -2, "message");
  luaL_setmetatable(L, ERROR_MT);
}

static void push_errorv(lua_State *L, const char *kind, const char *fmt, va_list ap) {
  char msg[512];
  vsnprintf(msg, sizeof msg, fmt, ap);
  push_error_table(L, kind, msg);
}

void luamp_error_push(lua_State *L, const char *kind, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  push_errorv(L, kind, fmt, ap);
  va_end(ap);
}

int luamp_raise(lua_State *L, const char *kind, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  push_errorv(L, kind, fmt, ap);
  va_end(ap);
  lua_error(L);
  __builtin_unreachable();
}

int luamp_raise_errno(lua_State *L, const char *kind, const char *what, int err) {
  luamp_raise(L, kind, "%s: %s", what, strerror(err));
}

int luamp_is_interrupted(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TTABLE || !lua_getmetatable(L, idx)) return 0;
  luaL_getmetatable(L, ERROR_MT);
  int ours = lua_rawequal(L, -1, -2);
  lua_pop(L, 2);
  if (!ours) return 0;
  lua_getfield(L, idx, "kind");
  const char *kind = lua_tostring(L, -1);
  int interrupted = kind && strcmp(kind, "Interrupted") == 0;
  lua_pop(L, 1);
  return interrupted;
}

static int check_kind(lua_State *L, int idx) {
  const char *kind = luaL_checkstring(L, idx);
  for (int i = 0; error_kinds[i]; i++)
    if (strcmp(kind, error_kinds[i]) == 0) return i;
  return luaL_error(L, "unknown luamp error kind '%s'", kind);
}

/* _core.error(kind, message, [fields]) -> error object (not raised). */
static int l_error_new(lua_State *L) {
  int k = check_kind(L, 1);
  const char *msg = luaL_optstring(L, 2, "");
  push_error_table(L, error_kinds[k], msg);
  if (lua_istable(L, 3)) {
    lua_pushnil(L);
    while (lua_next(L, 3)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, -4);
    }
  }
  return 1;
}

/* _core.raise(kind, message, [fields]): builds the object and raises it. */
static int l_error_raise(lua_State *L) {
  lua_settop(L, 3);
  l_error_new(L);
  return lua_error(L);
}

/* _core.is_error(v, [kind]) -> boolean */
static int l_is_error(lua_State *L) {
  int ok = 0;
  if (lua_getmetatable(L, 1)) {
    luaL_getmetatable(L, ERROR_MT);
    ok = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
  }
  if (ok && !lua_isnoneornil(L, 2)) {
    lua_getfield(L, 1, "kind");
    ok = lua_rawequal(L, -1, 2);
    lua_pop(L, 1);
  }
  lua_pushboolean(L, ok);
  return 1;
}

int luamp_open_error(lua_State *L) {
  if (luaL_newmetatable(L, ERROR_MT)) {
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushstring(L, "luamp.Error");
    lua_setfield(L, -2, "__name");
  }
  lua_setfield(L, -2, "error_mt");
  /* errors: Kind -> "Kind", so `err.kind == luamp.errors.Empty` reads well */
  lua_createtable(L, 0, 16);
  for (int i = 0; error_kinds[i]; i++) {
    lua_pushstring(L, error_kinds[i]);
    lua_setfield(L, -2, error_kinds[i]);
  }
  lua_setfield(L, -2, "errors");
  static const luaL_Reg fns[] = {
    {"error", l_error_new},
    {"raise", l_error_raise},
    {"is_error", l_is_error},
    {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return 0;
}
