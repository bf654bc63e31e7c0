/* test_codec.c — the codec's C API as other runtime files use it: luamp_encodex /
 * luamp_decodex never raise (they are called here with no protected call around them,
 * where a raise would abort the program), name paths from the caller's root, and refuse
 * functions in untrusted mode. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lualib.h>

#include "internal.h"

static int failures;

#define CHECK(cond) do { \
    if (!(cond)) { fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); failures++; } \
  } while (0)

static int panic(lua_State *L) {
  fprintf(stderr, "unprotected error: %s\n", luaL_tolstring(L, -1, NULL));
  abort();
}

/* The message of the luamp error object on top (popped). */
static const char *pop_message(lua_State *L, char *out, size_t n) {
  lua_getfield(L, -1, "kind");
  lua_getfield(L, -2, "message");
  snprintf(out, n, "%s: %s", lua_tostring(L, -2), lua_tostring(L, -1));
  lua_pop(L, 3);
  return out;
}

int main(void) {
  lua_State *L = luaL_newstate();
  lua_atpanic(L, panic);
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  char msg[512];

  /* a round trip through a caller's buffer */
  CHECK(luaL_dostring(L, "return {1, 'two', {three = 3.5}, string.format}") == LUA_OK);
  luamp_buf b;
  luamp_buf_init(&b);
  int top = lua_gettop(L);
  CHECK(luamp_encodex(L, -1, &b, "args") == 0);
  CHECK(lua_gettop(L) == top);
  CHECK(luamp_decodex(L, b.data, b.len, 0) == 0);
  lua_rawgeti(L, -1, 4);
  lua_getglobal(L, "string");
  lua_getfield(L, -1, "format");
  CHECK(lua_rawequal(L, -1, -3));
  lua_settop(L, 0);

  /* errors come back as objects naming the caller's root */
  CHECK(luaL_dostring(L, "return {1, {handler = coroutine.create(print)}}") == LUA_OK);
  b.len = 0;
  CHECK(luamp_encodex(L, 1, &b, "args") == -1);
  CHECK(strcmp(pop_message(L, msg, sizeof msg),
               "Serialize: args[2].handler: cannot send a coroutine") == 0);
  CHECK(luamp_encode(L, 1, &b) == -1);
  CHECK(strncmp(pop_message(L, msg, sizeof msg), "Serialize: value[2]", 19) == 0);
  lua_settop(L, 0);

  /* a failing hook is an error object too, not a raise */
  CHECK(luaL_dostring(L, "return setmetatable({}, {__luamp_handle = function() error('x') end})")
        == LUA_OK);
  b.len = 0;
  CHECK(luamp_encodex(L, 1, &b, "msg") == -1);
  CHECK(strstr(pop_message(L, msg, sizeof msg), "msg: handle hook failed") != NULL);
  lua_settop(L, 0);

  /* untrusted decoding refuses functions; trusted loads them */
  CHECK(luaL_dostring(L, "local k = 41 return function() return k + 1 end") == LUA_OK);
  b.len = 0;
  CHECK(luamp_encode(L, 1, &b) == 0);
  CHECK(luamp_decodex(L, b.data, b.len, LUAMP_DECODE_UNTRUSTED) == -1);
  CHECK(strstr(pop_message(L, msg, sizeof msg), "not accepted from an untrusted peer") != NULL);
  CHECK(luamp_decode(L, b.data, b.len) == 0);
  CHECK(lua_pcall(L, 0, 1, 0) == LUA_OK && lua_tointeger(L, -1) == 42);
  lua_settop(L, 0);

  /* every prefix of a valid encoding fails cleanly, leaving the stack as it was */
  CHECK(luaL_dostring(L, "local s = {'shared'} return {s, s, x = 1.5, y = ('z'):rep(100)}")
        == LUA_OK);
  b.len = 0;
  CHECK(luamp_encode(L, 1, &b) == 0);
  for (size_t n = 0; n < b.len; n++) {
    CHECK(luamp_decodex(L, b.data, n, LUAMP_DECODE_UNTRUSTED) == -1);
    CHECK(lua_gettop(L) == 2);
    lua_pop(L, 1);
  }
  luamp_buf_free(&b);
  lua_close(L);
  if (failures) fprintf(stderr, "%d failures\n", failures);
  else printf("test_codec: all checks passed\n");
  return failures != 0;
}
