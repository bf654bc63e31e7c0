/* test_spawn_host.c — a C host that embeds luamp and starts spawn and forkserver
 * children (a spawn and a forkserver Pool among them): it calls
 * luamp_child_main first thing in main (so its own executable can be re-entered as a
 * luamp child) and gives its own path to luamp_set_executable. The children it starts
 * therefore run in this program, not in the luamp host. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "luamp.h"

#include "test_util.h"

/* Runs src, which returns a string: "ok" or what went wrong. */
static void expect_ok(lua_State *L, const char *what, const char *src) {
  int status = luaL_loadstring(L, src);
  if (status == LUA_OK) status = lua_pcall(L, 0, 1, 0);
  const char *r = luaL_tolstring(L, -1, NULL);
  CHECK(status == LUA_OK && strcmp(r, "ok") == 0, "%s: %s", what, r);
  lua_pop(L, 2);
}

int main(int argc, char **argv) {
  luamp_child_main(argc, argv);      /* a spawn child runs here and exits */

  /* not a child: it returned at once, and a host's own arguments are left alone */
  char *fake[] = {argv[0], "--not-a-luamp-child", NULL};
  luamp_child_main(2, fake);

  char self[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) { perror("readlink"); return 1; }
  self[n] = '\0';
  luamp_set_executable(self);

  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);

  /* The child's exit code says it ran the target with its upvalues, without the host's
   * global, in this very program. */
  expect_ok(L, "spawn Process in this host",
    "HOST_GLOBAL = 'host'\n"
    "local exe_of = function(pid)\n"
    "  local f = io.popen('readlink /proc/' .. pid .. '/exe'); local s = f:read('l'); f:close(); return s end\n"
    "local me, k = exe_of(luamp.getpid()), 40\n"
    "local p = luamp.get_context('spawn').Process{target = function()\n"
    "  os.exit(HOST_GLOBAL == nil and exe_of(luamp.getpid()) == me and k + 2 or 1) end}\n"
    "p:start(); p:join()\n"
    "return p.exitcode == 42 and 'ok' or ('exitcode ' .. tostring(p.exitcode))\n");

  expect_ok(L, "error in a spawn child", 
    "local p = luamp.get_context('spawn').Process{target = function() error('x') end}\n"
    "p:start(); p:join()\n"
    "return p.exitcode == 1 and 'ok' or ('exitcode ' .. tostring(p.exitcode))\n");

  expect_ok(L, "spawn Pool in this host",
    "local pool <close> = luamp.get_context('spawn').Pool(2)\n"
    "local k = 3\n"
    "local r = pool:map(function(x) return x * k end, {1, 2, 3})\n"
    "if r[1] ~= 3 or r[2] ~= 6 or r[3] ~= 9 then return 'map gave ' .. table.concat(r, ' ') end\n"
    "local ok, e = pcall(pool.apply, pool, function() os.exit(5) end)\n"
    "if ok or e.kind ~= 'WorkerLost' then return 'no WorkerLost: ' .. tostring(e) end\n"
    "return pool:apply(function() return 'ok' end)\n");

  /* forkserver: the server is this program too (luamp_child_main serves), and forks the
   * Process and the Pool workers */
  expect_ok(L, "forkserver Process in this host",
    "local exe_of = function(pid)\n"
    "  local f = io.popen('readlink /proc/' .. pid .. '/exe'); local s = f:read('l'); f:close(); return s end\n"
    "local me, k = exe_of(luamp.getpid()), 40\n"
    "local p = luamp.get_context('forkserver').Process{target = function()\n"
    "  os.exit(HOST_GLOBAL == nil and exe_of(luamp.getpid()) == me and k + 2 or 1) end}\n"
    "p:start(); p:join()\n"
    "return p.exitcode == 42 and 'ok' or ('exitcode ' .. tostring(p.exitcode))\n");

  expect_ok(L, "forkserver Pool in this host",
    "local pool <close> = luamp.get_context('forkserver').Pool(2)\n"
    "local k = 3\n"
    "local r = pool:map(function(x) return x * k end, {1, 2, 3})\n"
    "if r[1] ~= 3 or r[2] ~= 6 or r[3] ~= 9 then return 'map gave ' .. table.concat(r, ' ') end\n"
    "local ok, e = pcall(pool.apply, pool, function() os.exit(5) end)\n"
    "if ok or e.kind ~= 'WorkerLost' then return 'no WorkerLost: ' .. tostring(e) end\n"
    "local res = pool:apply_async(function() luamp.sleep(60) end, {}, {timeout = 0.2})\n"
    "ok, e = pcall(res.get, res, 30)\n"
    "if ok or e.kind ~= 'Timeout' then return 'no Timeout: ' .. tostring(e) end\n"
    "return pool:apply(function() return 'ok' end)\n");

  lua_close(L);
  if (failures) fprintf(stderr, "%d failure(s)\n", failures);
  else printf("test_spawn_host: all passed\n");
  return failures ? 1 : 0;
}
