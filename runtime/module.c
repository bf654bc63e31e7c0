/*
 * module.c — luaopen_luamp: assembles the module.
 *
 * The C files each add their private functions to one core table (package.loaded
 * ["luamp._core"]), the few a spawn child needs at once and the rest on first use
 * (open_lazy); the Lua sources compiled into the binary (lua/, see cmake/embed.cmake)
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

/* Opened with the module: what a spawn child needs to read its start message and run a
 * target (errors, waits, the codec and its descriptors, processes, the random bytes of
 * the main process's authkey, the scheduler's wait hooks and its close guard). */
static const opener eager[] = {
  luamp_open_error,
  luamp_open_wait,
  luamp_open_codec,
  luamp_open_process,
  luamp_open_handles,
  luamp_open_bytecode,
  luamp_open_auth,
  luamp_open_sched,
  luamp_open_forkserver,
  NULL
};

/* Opened on first use (open_lazy) in a spawn child: their metatables and names were a
 * third of its Lua heap (~23 KB, each page of it a page fault) and ~350,000
 * instructions, for a target that may use none of them. Each registers what its objects
 * need (handle rebuilders, fork hooks) when it opens, before any of its objects can
 * exist. */
static const opener lazy[] = {
  luamp_open_repl,
  luamp_open_sync,
  luamp_open_shared,
  luamp_open_subprocess,
  luamp_open_connection,
  luamp_open_queue,
  luamp_open_pool,
  luamp_open_redis,
  NULL
};

/* Runs the openers into the core table at the top of the stack. */
static void run_openers(lua_State *L, const opener *o) {
  for (; *o; o++) {
    (*o)(L);
    luaL_checkstack(L, 4, NULL);
  }
}

/* The core table's __index (core, key), and _core._open_all(): opens the lazy parts into
 * the core table (its upvalue) the first time, dropping the metatable first so that
 * nothing they do comes back here; then answers the key. The first read of a name that
 * is not there (a Lua part loading, luamp.main's _load_all: the codec's unknown handle
 * type, a forkserver's start) opens them all. */
static int open_lazy(lua_State *L) {
  int top = lua_gettop(L);
  lua_pushvalue(L, lua_upvalueindex(1));
  int core = lua_gettop(L);
  if (lua_getmetatable(L, core)) {
    lua_pop(L, 1);
    lua_pushnil(L);
    lua_setmetatable(L, core);
    run_openers(L, lazy);
  }
  if (top < 2) return 0;
  lua_pushvalue(L, 2);
  lua_rawget(L, core);
  return 1;
}

int luaopen_luamp(lua_State *L) {
  luamp_exit_hooks_install(L);
  install_embedded(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_createtable(L, 0, 64);
  run_openers(L, eager);
  lua_pushvalue(L, -1);
  lua_pushcclosure(L, open_lazy, 1);
  lua_createtable(L, 0, 1);
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, -3);
  lua_setfield(L, -2, "_open_all");
  /* Only a process luamp spawned starts lean. A program opens the rest now, as it always
   * did: its forked children find every part in the pages they share with it, and its
   * heap keeps the size its collector is paced by (opened lazily, the fork benchmark's
   * parent took ~2 more copy-on-write faults per child: a smaller heap is collected
   * more often, and each collection while a child runs writes pages they share). */
  if (!luamp_spawned) {
    lua_getfield(L, -1, "_open_all");
    lua_call(L, 0, 0);
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
