/*
 * fuzz_codec.c — libFuzzer target for the value codec.
 *
 * No input is ever decoded trusted (no bytecode is ever loaded). Each input is decoded
 * three ways: by luamp.loads(s) called from Lua, as a program reading bytes from outside
 * does (untrusted by default); by luamp_decodex with LUAMP_DECODE_UNTRUSTED, which must
 * agree with it; and with LUAMP_DECODE_NO_CODE only, which also accepts the tags that
 * hand out live objects (global table, named modules and fields, handles), so those
 * decoding paths are fuzzed too. Whatever decodes must re-encode, the encoding must
 * decode again in the same mode, and the two decoded values must be structurally equal
 * (same shape, same scalars bit for bit, same sharing of named objects). Any crash,
 * sanitizer report, hang, disagreement or broken round trip is a bug. A "fuzz" handle
 * type is registered so that the handle path is exercised too.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lualib.h>

#include "internal.h"

static lua_State *L;

static const char setup_lua[] =
  "local core = require 'luamp._core'\n"
  "local mt = {}\n"
  "mt.__luamp_handle = function(o) return 'fuzz', o.payload end\n"
  "core.register_handle('fuzz', function(p) return setmetatable({payload = p}, mt) end)\n";

static void setup(void) {
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  if (luaL_dostring(L, setup_lua) != LUA_OK) {
    fprintf(stderr, "fuzz setup: %s\n", lua_tostring(L, -1));
    abort();
  }
}

static int same_number(lua_State *S, int a, int b) {
  if (lua_isinteger(S, a) != lua_isinteger(S, b)) return 0;
  if (lua_isinteger(S, a)) return lua_tointeger(S, a) == lua_tointeger(S, b);
  double x = lua_tonumber(S, a), y = lua_tonumber(S, b);
  return memcmp(&x, &y, sizeof x) == 0;
}

static int is_scalar_key(lua_State *S, int idx) {
  int t = lua_type(S, idx);
  return t == LUA_TNUMBER || t == LUA_TSTRING || t == LUA_TBOOLEAN;
}

/* Structural equality of the values at a and b (absolute indices). `seen` (absolute)
 * maps each table of the first value already paired to its partner, so cycles end. */
static int equal(lua_State *S, int a, int b, int seen) {
  int t = lua_type(S, a);
  if (t != lua_type(S, b)) return 0;
  if (t == LUA_TNUMBER) return same_number(S, a, b);
  if (t != LUA_TTABLE || lua_rawequal(S, a, b)) return lua_rawequal(S, a, b);
  /* recursion follows each table once (seen), so it is bounded by the input's size */
  luaL_checkstack(S, 10, NULL);
  lua_pushvalue(S, a);
  if (lua_rawget(S, seen) != LUA_TNIL) {
    int ok = lua_rawequal(S, -1, b);
    lua_pop(S, 1);
    return ok;
  }
  lua_pop(S, 1);
  lua_pushvalue(S, a);
  lua_pushvalue(S, b);
  lua_rawset(S, seen);
  /* metatables: equal structure (named ones are the same object) */
  int ma = lua_getmetatable(S, a), mb = lua_getmetatable(S, b);
  if (ma != mb) { lua_pop(S, ma + mb); return 0; }
  if (ma) {
    int top = lua_gettop(S);
    int ok = equal(S, top - 1, top, seen);
    lua_pop(S, 2);
    if (!ok) return 0;
  }
  /* every scalar key of a maps to an equal value in b; other keys are only counted */
  long na = 0, nb = 0, oa = 0, ob = 0;
  lua_pushnil(S);
  while (lua_next(S, a)) {
    int k = lua_gettop(S) - 1;
    na++;
    if (is_scalar_key(S, k)) {
      lua_pushvalue(S, k);
      lua_rawget(S, b);
      int ok = equal(S, k + 1, k + 2, seen);
      lua_pop(S, 1);
      if (!ok) { lua_pop(S, 2); return 0; }
    } else {
      oa++;
    }
    lua_pop(S, 1);
  }
  lua_pushnil(S);
  while (lua_next(S, b)) {
    nb++;
    if (!is_scalar_key(S, -2)) ob++;
    lua_pop(S, 1);
  }
  return na == nb && oa == ob;
}

/* Is the value at the top a luamp Serialize error object? */
static int is_serialize_error(lua_State *S) {
  if (!lua_istable(S, -1)) return 0;
  lua_getfield(S, -1, "kind");
  const char *k = lua_tostring(S, -1);
  int yes = k && strcmp(k, "Serialize") == 0;
  lua_pop(S, 1);
  return yes;
}

static int deep_error(lua_State *S) {
  lua_getfield(S, -1, "message");
  const char *m = lua_tostring(S, -1);
  int deep = m && strstr(m, "too deeply nested");
  lua_pop(S, 1);
  return deep;
}

/* Decodes in one mode; when it decodes, checks the round trip. Returns whether it
 * decoded. Leaves the stack as it found it. */
static int decode_and_round_trip(const uint8_t *data, size_t size, int flags) {
  int base = lua_gettop(L);
  int ok = luamp_decodex(L, (const char *)data, size, flags) == 0;
  if (ok) {
    int v = lua_gettop(L);
    luamp_buf b;
    luamp_buf_init(&b);
    if (luamp_encode(L, v, &b) != 0) {
      /* sharing decoded along one path may be met first along a deeper one */
      if (!deep_error(L)) {
        fprintf(stderr, "re-encode failed: %s\n", luaL_tolstring(L, -1, NULL));
        abort();
      }
    } else {
      if (luamp_decodex(L, b.data, b.len, flags) != 0) {
        fprintf(stderr, "decode of own encoding failed (flags %d): %s\n", flags,
                luaL_tolstring(L, -1, NULL));
        abort();
      }
      lua_newtable(L);
      if (!equal(L, v, v + 1, v + 2)) {
        fprintf(stderr, "round trip changed the value\n");
        abort();
      }
    }
    luamp_buf_free(&b);
  } else if (!is_serialize_error(L)) {
    fprintf(stderr, "decode failed with something else than Serialize: %s\n",
            luaL_tolstring(L, -1, NULL));
    abort();
  }
  lua_settop(L, base);
  return ok;
}

/* luamp.loads(s) from Lua, with no options: whether it decoded. */
static int public_loads(const uint8_t *data, size_t size) {
  int base = lua_gettop(L);
  lua_getglobal(L, "luamp");
  lua_getfield(L, -1, "loads");
  lua_pushlstring(L, (const char *)data, size);
  int ok = lua_pcall(L, 1, 1, 0) == LUA_OK;
  if (!ok && !is_serialize_error(L)) {
    fprintf(stderr, "luamp.loads raised something else than Serialize: %s\n",
            luaL_tolstring(L, -1, NULL));
    abort();
  }
  lua_settop(L, base);
  return ok;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!L) setup();
  lua_gc(L, LUA_GCSTOP);     /* weak tables must not change between decode and compare */
  int by_lua = public_loads(data, size);
  int untrusted = decode_and_round_trip(data, size, LUAMP_DECODE_UNTRUSTED);
  if (by_lua != untrusted) {
    fprintf(stderr, "luamp.loads and LUAMP_DECODE_UNTRUSTED disagree\n");
    abort();
  }
  int no_code = decode_and_round_trip(data, size, LUAMP_DECODE_NO_CODE);
  if (untrusted && !no_code) {
    fprintf(stderr, "refused with fewer refusals, accepted with more\n");
    abort();
  }
  lua_gc(L, LUA_GCRESTART);
  static unsigned runs;
  if (++runs % 256 == 0) lua_gc(L, LUA_GCCOLLECT);  /* stopped GC cannot keep up alone */
  return 0;
}
