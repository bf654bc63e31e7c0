/* test_embed.c — luamp embedded in a C program through luamp.h only, as an application
 * would: open it, run Processes, interrupt a call with SIGINT, run the REPL on a pipe. */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "luamp.h"

#include "test_util.h"

static lua_State *new_state(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  return L;
}

/* Runs src; on failure returns the error as text in *err (static storage). */
static int run(lua_State *L, const char *src, int nresults, const char **err) {
  static char msg[512];
  int status = luaL_loadstring(L, src);
  if (status == LUA_OK) status = lua_pcall(L, 0, nresults, 0);
  if (status != LUA_OK) {
    snprintf(msg, sizeof msg, "%s", luaL_tolstring(L, -1, NULL));
    lua_pop(L, 2);
    *err = msg;
  }
  return status;
}

static void test_processes(void) {
  lua_State *L = new_state();
  const char *err = NULL;
  int status = run(L,
    "local p = luamp.Process{target = function(code) os.exit(code) end, args = {7}}\n"
    "p:start(); p:join()\n"
    "return p.exitcode, require('luamp') == luamp, luamp.version", 3, &err);
  CHECK(status == LUA_OK, "chunk failed: %s", err);
  if (status == LUA_OK) {
    CHECK(lua_tointeger(L, 1) == 7, "exitcode %lld, expected 7", (long long)lua_tointeger(L, 1));
    CHECK(lua_toboolean(L, 2), "require 'luamp' is not the global luamp");
    CHECK(lua_tostring(L, 3) && strcmp(lua_tostring(L, 3), LUAMP_VERSION) == 0, "version");
  }
  lua_close(L);
}

static int l_raise_sigint(lua_State *L) {
  (void)L;
  raise(SIGINT);
  return 0;
}

/* SIGINT from another process a moment later: it most likely lands while the caller is
 * blocked in a luamp wait (if earlier, the hook reports it instead; either way the call
 * must end with Interrupted). */
static int l_sigint_soon(lua_State *L) {
  (void)L;
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid == 0) {
    usleep(50000);
    kill(parent, SIGINT);
    _exit(0);
  }
  lua_pushinteger(L, pid);
  lua_setglobal(L, "helper_pid");
  return 0;
}

static int l_kind(lua_State *L) {
  if (!lua_istable(L, 1)) return 0;
  lua_getfield(L, 1, "kind");
  return 1;
}

/* A SIGINT during luamp_pcall_interruptible ends the call with luamp.Interrupted, both
 * in a pure Lua loop and in a luamp wait; afterwards the host's disposition is back. */
static void test_interruptible_call(void) {
  static const char *const chunks[] = {
    "raise_sigint() while true do end",
    "raise_sigint() luamp.sleep(60)",
    "sigint_soon() luamp.sleep(60)",
    NULL
  };
  struct sigaction dfl, before, after;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigaction(SIGINT, &dfl, &before);
  lua_State *L = new_state();
  lua_register(L, "raise_sigint", l_raise_sigint);
  lua_register(L, "sigint_soon", l_sigint_soon);
  for (int i = 0; chunks[i]; i++) {
    luaL_loadstring(L, chunks[i]);
    int status = luamp_pcall_interruptible(L, 0, 0, 0);
    CHECK(status == LUA_ERRRUN, "'%s' was not interrupted (status %d)", chunks[i], status);
    lua_pushcfunction(L, l_kind);
    lua_insert(L, -2);
    lua_call(L, 1, 1);
    const char *kind = lua_tostring(L, -1);
    CHECK(kind && strcmp(kind, "Interrupted") == 0, "'%s': error kind %s", chunks[i], kind ? kind : "(none)");
    lua_pop(L, 1);
  }
  lua_getglobal(L, "helper_pid");
  waitpid((pid_t)lua_tointeger(L, -1), NULL, 0);
  lua_pop(L, 1);
  /* once the call is over, the next one is not hit by a leftover interrupt */
  luaL_loadstring(L, "luamp.sleep(0.01) for i = 1, 1000 do end return 'done'");
  int status = luamp_pcall_interruptible(L, 0, 1, 0);
  CHECK(status == LUA_OK && strcmp(lua_tostring(L, -1), "done") == 0, "a later call was interrupted");
  lua_pop(L, 1);
  sigaction(SIGINT, NULL, &after);
  CHECK(after.sa_handler == SIG_DFL, "SIGINT disposition not restored");
  lua_close(L);
  sigaction(SIGINT, &before, NULL);
}

/* Replaces fd `target` with `with`; returns a copy of the old one. */
static int swap_fd(int target, int with) {
  int saved = dup(target);
  dup2(with, target);
  close(with);
  return saved;
}

/* The REPL on a non-terminal stdin: results printed plainly, state kept between lines. */
static void test_repl_on_a_pipe(void) {
  char in_path[] = "/tmp/luamp_embed_inXXXXXX", out_path[] = "/tmp/luamp_embed_outXXXXXX";
  int in = mkstemp(in_path), out = mkstemp(out_path);
  if (in < 0 || out < 0) { CHECK(0, "mkstemp"); return; }
  const char *input = "x = 20\nx + 22\nreturn 'a', {1, b = true}\n";
  if (write(in, input, strlen(input)) != (ssize_t)strlen(input)) CHECK(0, "write");
  lseek(in, 0, SEEK_SET);
  lua_State *L = new_state();
  fflush(stdout);
  int saved_in = swap_fd(STDIN_FILENO, in), saved_out = swap_fd(STDOUT_FILENO, out);
  int rc = luamp_repl(L);
  fflush(stdout);
  clearerr(stdin);
  swap_fd(STDIN_FILENO, saved_in);
  swap_fd(STDOUT_FILENO, saved_out);
  CHECK(rc == 0, "luamp_repl returned %d", rc);
  lua_getglobal(L, "x");
  CHECK(lua_tointeger(L, -1) == 20, "the REPL's assignment is not in the state");
  lua_close(L);
  char buf[256] = {0};
  FILE *f = fopen(out_path, "r");
  size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
  if (f) fclose(f);
  buf[n] = '\0';
  CHECK(strcmp(buf, "42\n\"a\"\t{1, b = true}\n") == 0, "REPL output was '%s'", buf);
  unlink(in_path);
  unlink(out_path);
}

int main(void) {
  test_processes();
  test_interruptible_call();
  test_repl_on_a_pipe();
  return test_done("test_embed");
}
