/* main.c — placeholder host: runs one script with luamp preloaded. */
#include <stdio.h>
#include <stdlib.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include "luamp.h"

static int msgh(lua_State *L) {
  const char *m = lua_tostring(L, 1);
  if (!m) m = luaL_tolstring(L, 1, NULL);
  luaL_traceback(L, L, m, 1);
  return 1;
}

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  int rc = 0;
  if (argc > 1) {
    lua_createtable(L, argc, 1);
    for (int i = 0; i < argc; i++) { lua_pushstring(L, argv[i]); lua_rawseti(L, -2, i - 1); }
    lua_setglobal(L, "arg");
    lua_pushcfunction(L, msgh);
    if (luaL_loadfile(L, argv[1]) != LUA_OK || lua_pcall(L, 0, 0, -2) != LUA_OK) {
      fprintf(stderr, "luamp: %s\n", lua_tostring(L, -1));
      rc = 1;
    }
  }
  lua_close(L);
  return rc;
}
