/*
 * module.c — luaopen_luamp: assembles the module.
 *
 * The C files each add their private functions to one core table (package.loaded
 * ["luamp._core"]); the Lua sources compiled into the binary (lua/, see cmake/embed.cmake)
 * go into package.preload; then "luamp.main" builds the public table from both. It is
 * the top layer: it calls every opener, and nothing calls it. What runs at the end of the
 * program (joining the children still running...) is registered with the base by the
 * files that own it; luaopen_luamp only arranges for the base to run it (base.h).
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct luamp_embedded { const char *name, *chunkname, *src; size_t len; };
extern const struct luamp_embedded luamp_embedded_modules[];
/* the same modules precompiled at build time (cmake/bytecode_dump.c) */
struct luamp_embedded_bytecode { const char *name; const unsigned char *code; size_t len; };
extern const struct luamp_embedded_bytecode luamp_embedded_bytecode[];

/* Loads a module's bytecode: a fresh interpreter (every spawn child) then does not parse
 * the sources again, which was most of its start. A Lua that cannot load it (another
 * release's bytecode format: luamp.so in an interpreter other than the one it was built
 * for) parses the source instead. */
static int embedded_loader(lua_State *L) {
  const struct luamp_embedded *m = lua_touserdata(L, lua_upvalueindex(1));
  const struct luamp_embedded_bytecode *bc = lua_touserdata(L, lua_upvalueindex(2));
  if (!bc || luaL_loadbufferx(L, (const char *)bc->code, bc->len, m->chunkname, "b") != LUA_OK) {
    lua_settop(L, 0);
    if (luaL_loadbufferx(L, m->src, m->len, m->chunkname, "t") != LUA_OK) return lua_error(L);
  }
  lua_pushstring(L, m->name);
  lua_call(L, 1, 1);
  return 1;
}

static void install_embedded(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  for (const struct luamp_embedded *m = luamp_embedded_modules; m->name; m++) {
    const struct luamp_embedded_bytecode *bc = luamp_embedded_bytecode;
    while (bc->name && strcmp(bc->name, m->name) != 0) bc++;
    lua_pushlightuserdata(L, (void *)m);
    lua_pushlightuserdata(L, bc->name ? (void *)bc : NULL);
    lua_pushcclosure(L, embedded_loader, 2);
    lua_setfield(L, -2, m->name);
  }
  lua_pop(L, 1);
}

typedef int (*opener)(lua_State *L);
static const opener openers[] = {
  luamp_open_error,
  luamp_open_wait,
  luamp_open_codec,
  luamp_open_process,
  luamp_open_repl,
  luamp_open_sync,
  luamp_open_shared,
  luamp_open_subprocess,
  luamp_open_connection,
  luamp_open_queue,
  luamp_open_pool,
  luamp_open_handles,
  luamp_open_bytecode,
  luamp_open_redis,
  luamp_open_auth,
  luamp_open_sched,
  luamp_open_forkserver,
  NULL
};

int luaopen_luamp(lua_State *L) {
  luamp_exit_hooks_install(L);
  install_embedded(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_createtable(L, 0, 64);
  for (const opener *o = openers; *o; o++) {
    (*o)(L);
    luaL_checkstack(L, 4, NULL);
  }
  lua_pushstring(L, LUAMP_VERSION);
  lua_setfield(L, -2, "version");
  lua_setfield(L, -2, "luamp._core");
  lua_pop(L, 1);
  lua_getglobal(L, "require");
  lua_pushstring(L, "luamp.main");
  lua_call(L, 1, 1);
  return 1;
}
