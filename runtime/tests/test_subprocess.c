/* test_subprocess.c — Ctrl-C (as the host reports it, through luamp_request_interrupt)
 * ends a subprocess wait with Interrupted promptly; run() then kills and reaps its child,
 * and the runtime stays usable. Lua has no way to raise the interrupt, hence C. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>

#include <lualib.h>

#include "internal.h"

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
  fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } } while (0)

static void on_alarm(int sig) {
  (void)sig;
  luamp_request_interrupt();
}

static void interrupt_in(double secs) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_alarm;
  sigaction(SIGALRM, &sa, NULL);
  struct itimerval it = {{0, 0}, {(time_t)secs, (suseconds_t)((secs - (time_t)secs) * 1e6)}};
  setitimer(ITIMER_REAL, &it, NULL);
}

/* Runs `src`, which returns a string, with an interrupt due after `secs` unless 0. */
static const char *run_lua(lua_State *L, const char *src, double secs) {
  if (secs > 0) interrupt_in(secs);
  if (luaL_dostring(L, src) != LUA_OK) {
    fprintf(stderr, "lua error: %s\n", lua_tostring(L, -1));
    return "error";
  }
  return lua_tostring(L, -1);
}

int main(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);

  const char *r = run_lua(L,
    "local t0 = luamp.time()\n"
    "local ok, e = pcall(luamp.subprocess.run, {'sleep', '10'}, {capture_output = true})\n"
    "return string.format('%s %s', e.kind, luamp.time() - t0 < 3)", 0.2);
  CHECK(strcmp(r, "Interrupted true") == 0, "run: got '%s'", r);

  r = run_lua(L,
    "local p = luamp.subprocess.Popen({'sleep', '10'}, {stdout = 'pipe'})\n"
    "local ok, e = pcall(p.stdout.read, p.stdout, 'a')\n"
    "local alive = p:poll() == nil\n"
    "p:kill()\n"
    "return string.format('%s %s %d', e.kind, alive, p:wait())", 0.2);
  CHECK(strcmp(r, "Interrupted true -9") == 0, "read: got '%s'", r);

  r = run_lua(L, "return tostring(luamp.subprocess.run({'true'}).returncode)", 0);
  CHECK(strcmp(r, "0") == 0, "run after interrupts: got '%s'", r);

  lua_close(L);
  if (failures) return 1;
  puts("test_subprocess: ok");
  return 0;
}
