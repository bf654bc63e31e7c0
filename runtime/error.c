/*
 * error.c — luamp's error objects.
 *
 * Every error luamp raises is a table {kind = <Kind>, message = <text>, ...} sharing one
 * metatable (registry "luamp.Error") whose __tostring renders "luamp.<Kind>: <message>",
 * so that uncaught errors print readably in any host. Lua code raises them through
 * `_core.raise(kind, message, [fields], [level])` and C through luamp_raise().
 *
 * Any value may be raised, so every place that shows an error to a person goes through
 * one renderer (luamp_push_error_text): a table without __tostring shows its `message`
 * or `msg` field, else its pformat, never "table: 0x...". luamp_traceback (public, a
 * message handler) adds the traceback, and for a Remote error first the worker's
 * traceback, as Python prints a chained exception: cause first, then "The above error
 * in a worker was the direct cause of the following error:", then the local one.
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

static int tolstring_call(lua_State *L) {
  luaL_tolstring(L, 1, NULL);
  return 1;
}

static int is_error_object(lua_State *L, int idx) {
  int ok = 0;
  if (lua_getmetatable(L, idx)) {
    luaL_getmetatable(L, ERROR_MT);
    ok = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
  }
  return ok;
}

/* pformat of the value at idx through luamp.pretty, or NULL (pushes nothing) when that
 * is unavailable or fails: a renderer of errors must not raise one of its own. */
/* lua_pcall for the renderer, which runs in message handlers where raising again would
 * only give "error in error handling": a Ctrl-C caught here is asked for again, so the
 * next wait raises it (Ctrl-C always wins), and the rendering goes on. */
static int render_pcall(lua_State *L, int nargs) {
  int status = lua_pcall(L, nargs, 1, 0);
  if (status != LUA_OK && luamp_is_interrupted(L, -1)) luamp_request_interrupt();
  return status;
}

static const char *push_pformat(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  if (!lua_checkstack(L, 4)) return NULL;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "luamp.pretty");
  if (render_pcall(L, 1) != LUA_OK || !lua_istable(L, -1)) {
    lua_pop(L, 1);
    return NULL;
  }
  lua_getfield(L, -1, "pformat");
  lua_remove(L, -2);
  lua_pushvalue(L, idx);
  if (render_pcall(L, 1) != LUA_OK || lua_type(L, -1) != LUA_TSTRING) {
    lua_pop(L, 1);
    return NULL;
  }
  return lua_tostring(L, -1);
}

const char *luamp_push_error_text(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  luaL_checkstack(L, 6, NULL);
  switch (lua_type(L, idx)) {
    case LUA_TSTRING: case LUA_TNUMBER:
      lua_pushvalue(L, idx);
      return lua_tostring(L, -1);
    case LUA_TNIL:
      return lua_pushliteral(L, "nil");
    default: break;
  }
  if (luaL_getmetafield(L, idx, "__tostring") != LUA_TNIL) {
    lua_pop(L, 1);
    lua_pushcfunction(L, tolstring_call);
    lua_pushvalue(L, idx);
    if (render_pcall(L, 1) == LUA_OK && lua_type(L, -1) == LUA_TSTRING) return lua_tostring(L, -1);
    lua_pop(L, 1);
  }
  if (lua_type(L, idx) == LUA_TTABLE) {
    static const char *const fields[] = {"message", "msg", NULL};
    for (int i = 0; fields[i]; i++) {
      lua_pushstring(L, fields[i]);
      if (lua_rawget(L, idx) == LUA_TSTRING) return lua_tostring(L, -1);
      lua_pop(L, 1);
    }
    const char *s = push_pformat(L, idx);
    if (s) return s;
  }
  return lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, idx));
}

/* The remote traceback of a Remote error at idx pushed (returns 1), or nothing (0). */
static int push_remote_traceback(lua_State *L, int idx) {
  if (!is_error_object(L, idx)) return 0;
  lua_getfield(L, idx, "kind");
  int remote = lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), "Remote") == 0;
  lua_pop(L, 1);
  if (!remote) return 0;
  lua_getfield(L, idx, "remote_traceback");
  if (lua_type(L, -1) == LUA_TSTRING && lua_rawlen(L, -1) > 0) return 1;
  lua_pop(L, 1);
  return 0;
}

#define CAUSE_LINE "\n\nThe above error in a worker was the direct cause of the following error:\n\n"

void luamp_push_error_report(lua_State *L, int idx, lua_State *co, int level) {
  idx = lua_absindex(L, idx);
  luaL_checkstack(L, 6, NULL);
  int base = lua_gettop(L);
  if (push_remote_traceback(L, idx)) lua_pushliteral(L, CAUSE_LINE);
  luaL_traceback(L, co, luamp_push_error_text(L, idx), level);
  lua_remove(L, -2);
  lua_concat(L, lua_gettop(L) - base);
}

int luamp_traceback(lua_State *L) {
  lua_settop(L, 1);
  luamp_push_error_report(L, 1, L, 1);
  return 1;
}

/* _core.error_text(e) -> string */
static int l_error_text(lua_State *L) {
  luaL_checkany(L, 1);
  luamp_push_error_text(L, 1);
  return 1;
}

/* _core.error_report(e, [level]) -> text and traceback of the caller from `level` */
static int l_error_report(lua_State *L) {
  luaL_checkany(L, 1);
  int level = (int)luaL_optinteger(L, 2, 1);
  luamp_push_error_report(L, 1, L, level);
  return 1;
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
    {"error_text", l_error_text},
    {"error_report", l_error_report},
    {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return 0;
}
