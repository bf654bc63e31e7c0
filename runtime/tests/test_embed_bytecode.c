/* test_embed_bytecode.c — luamp's own Lua modules load as the bytecode precompiled at
 * build time (cmake/bytecode_dump.c), not by parsing their sources: every spawn child
 * loads them afresh. They keep their chunk names, so tracebacks are unchanged. This
 * program's lua_load() stands in for the Lua library's and looks at the first byte of
 * each chunk it is given. */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "luamp.h"

static int binary_loads, text_loads;

typedef struct peek { lua_Reader reader; void *data; int first; const char *chunk; } peek;

static const char *peek_reader(lua_State *L, void *ud, size_t *size) {
  peek *p = ud;
  const char *s = p->reader(L, p->data, size);
  if (p->first && s && *size > 0) {
    p->first = 0;
    if (p->chunk && strncmp(p->chunk, "@luamp/", 7) == 0) {
      if (s[0] == LUA_SIGNATURE[0]) binary_loads++;
      else text_loads++;
    }
  }
  return s;
}

int lua_load(lua_State *L, lua_Reader reader, void *data, const char *chunkname, const char *mode) {
  static int (*real)(lua_State *, lua_Reader, void *, const char *, const char *);
  if (!real) real = (int (*)(lua_State *, lua_Reader, void *, const char *, const char *))dlsym(RTLD_NEXT, "lua_load");
  peek p = {reader, data, 1, chunkname};
  return real(L, peek_reader, &p, chunkname, mode);
}

int main(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  int failures = 0;
  const char *script =
    "luamp._load_all()\n"
    "local info = debug.getinfo(require('luamp.process').Process, 'S')\n"
    "assert(info.source == '@luamp/process.lua', 'chunk name: ' .. tostring(info.source))\n"
    "local ok, e = pcall(luamp.Process, {target = 1})\n"
    "assert(not ok and tostring(e):find('callable'), tostring(e))\n";
  if (luaL_dostring(L, script) != LUA_OK) {
    fprintf(stderr, "test_embed_bytecode: %s\n", lua_tostring(L, -1));
    failures++;
  }
  lua_close(L);
  printf("test_embed_bytecode: %d of luamp's modules loaded as bytecode, %d parsed\n",
         binary_loads, text_loads);
  if (binary_loads < 10) {
    fprintf(stderr, "test_embed_bytecode: too few modules loaded as bytecode\n");
    failures++;
  }
  if (text_loads != 0) {
    fprintf(stderr, "test_embed_bytecode: %d modules were parsed from source\n", text_loads);
    failures++;
  }
  if (failures) return 1;
  printf("test_embed_bytecode: ok\n");
  return 0;
}
