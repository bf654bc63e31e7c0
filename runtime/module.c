/*
 * module.c — luaopen_luamp: assembles the module.
 *
 * The C files each add their private functions to one core table (package.loaded
 * ["luamp._core"]); the Lua sources compiled into the binary (lua/, see cmake/embed.cmake)
 * go into package.preload; then "luamp.main" builds the public table from both. This
 * file also owns the executable an embedding host passes in (its loop is loop.c's) and
 * the end-of-program hook that joins or terminates the children still running.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct luamp_embedded { const char *name, *chunkname, *src; size_t len; };
extern const struct luamp_embedded luamp_embedded_modules[];

static char *executable_path;

void luamp_set_executable(const char *path) {
  char *copy = path ? strdup(path) : NULL;
  free(executable_path);
  executable_path = copy;
}

const char *luamp_executable(void) { return executable_path; }

static int embedded_loader(lua_State *L) {
  const struct luamp_embedded *m = lua_touserdata(L, lua_upvalueindex(1));
  if (luaL_loadbuffer(L, m->src, m->len, m->chunkname) != LUA_OK) return lua_error(L);
  lua_pushstring(L, m->name);
  lua_call(L, 1, 1);
  return 1;
}

static void install_embedded(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  for (const struct luamp_embedded *m = luamp_embedded_modules; m->name; m++) {
    lua_pushlightuserdata(L, (void *)m);
    lua_pushcclosure(L, embedded_loader, 1);
    lua_setfield(L, -2, m->name);
  }
  lua_pop(L, 1);
}

/* A registry-held userdata whose __gc runs at lua_close: the end of the main script in
 * both the luamp host and stock lua5.4. atexit covers os.exit() without a close. */
static int finish_gc(lua_State *L) {
  (void)L;
  luamp_children_finish();
  return 0;
}

static void at_process_exit(void) { luamp_children_finish(); }

int luamp_on_close(lua_State *L, const char *key, lua_CFunction fn) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, key) != LUA_TNIL) {
    lua_pop(L, 1);
    return 0;
  }
  lua_pop(L, 1);
  lua_newuserdatauv(L, 1, 0);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, fn);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_setfield(L, LUA_REGISTRYINDEX, key);
  return 1;
}

static void install_finish_hook(lua_State *L) {
  static int atexit_done;
  if (!luamp_on_close(L, "luamp.finish", finish_gc)) return;
  if (!atexit_done) {
    atexit(at_process_exit);
    atexit_done = 1;
  }
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
  luamp_open_forkserver,
  NULL
};

int luaopen_luamp(lua_State *L) {
  install_finish_hook(L);
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
