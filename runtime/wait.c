/*
 * wait.c — the runtime's clock and its one wait primitive.
 *
 * Every blocking call in luamp (join, recv, get, acquire, sleep...) ends up in
 * luamp_wait_fds(): wait until one of a set of fds is ready or a deadline passes. Having a
 * single place means signals are handled once (EINTR retried against the remaining time,
 * a pending Ctrl-C turned into Interrupted) and the coroutine scheduler can later swap
 * blocking for suspension here. Deadlines are absolute CLOCK_MONOTONIC seconds.
 */
#include <math.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

static volatile sig_atomic_t interrupt_pending;

void luamp_request_interrupt(void) { interrupt_pending = 1; }

int luamp_take_interrupt(void) {
  int was = interrupt_pending;
  interrupt_pending = 0;
  return was;
}

double luamp_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double luamp_deadline_arg(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return -1;
  if (!lua_isnumber(L, idx))
    luamp_raise(L, "Value", "timeout must be a number or nil, got %s", luaL_typename(L, idx));
  double t = lua_tonumber(L, idx);
  if (isnan(t)) luamp_raise(L, "Value", "timeout must not be NaN");
  if (t < 0) t = 0;
  if (isinf(t)) return -1;
  return luamp_now() + t;
}

/* Milliseconds to pass to poll() for a deadline; rounds up so we never wake early. */
static int remaining_ms(double deadline) {
  if (deadline < 0) return -1;
  double left = deadline - luamp_now();
  if (left <= 0) return 0;
  double ms = ceil(left * 1000.0);
  return ms > 86400000.0 ? 86400000 : (int)ms;
}

int luamp_wait_fds(struct pollfd *fds, int nfds, double deadline) {
  for (;;) {
    if (interrupt_pending) return -2;
    int ms = remaining_ms(deadline);
    int n = poll(fds, (nfds_t)nfds, ms);
    if (n >= 0) {
      /* poll's millisecond granularity may wake us a hair early on a pure timeout */
      if (n == 0 && deadline >= 0 && luamp_now() < deadline) continue;
      return n;
    }
    if (errno != EINTR) return -1;
  }
}

void luamp_close_fd(int fd) {
  int saved = errno;
  if (fd >= 0) close(fd);
  errno = saved;
}

/* ---- Lua binding ---------------------------------------------------------------------- */

static int l_time(lua_State *L) {
  lua_pushnumber(L, luamp_now());
  return 1;
}

static void raise_wait_failure(lua_State *L, int rc) {
  if (rc == -2) {
    luamp_take_interrupt();
    luamp_raise(L, "Interrupted", "interrupted");
  }
  luamp_raise_errno(L, "Value", "wait", errno);
}

/* sleep(seconds) */
static int l_sleep(lua_State *L) {
  double s = luaL_checknumber(L, 1);
  if (s < 0) luamp_raise(L, "Value", "sleep length must be non-negative");
  int rc = luamp_wait_fds(NULL, 0, luamp_now() + s);
  if (rc < 0) raise_wait_failure(L, rc);
  return 0;
}

/* wait_fds({fd, ...}, [timeout], [events]) -> {ready fd, ...}
 * events: "r" (default) for readable, "w" for writable. Hang-ups and errors count as
 * ready so the caller finds out by reading. */
static int l_wait_fds(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  double deadline = luamp_deadline_arg(L, 2);
  const char *ev = luaL_optstring(L, 3, "r");
  short events = ev[0] == 'w' ? POLLOUT : POLLIN;
  lua_Integer n = luaL_len(L, 1);
  if (n < 0 || n > 4096) luamp_raise(L, "Value", "cannot wait on %lld objects", (long long)n);
  struct pollfd stackfds[64];
  struct pollfd *fds = n <= 64 ? stackfds : lua_newuserdatauv(L, sizeof *fds * (size_t)n, 0);
  for (lua_Integer i = 0; i < n; i++) {
    lua_geti(L, 1, i + 1);
    int isnum;
    lua_Integer fd = lua_tointegerx(L, -1, &isnum);
    lua_pop(L, 1);
    if (!isnum || fd < 0 || fd > INT32_MAX) luamp_raise(L, "Value", "wait: item %lld is not a file descriptor", (long long)i + 1);
    fds[i].fd = (int)fd;
    fds[i].events = events;
    fds[i].revents = 0;
  }
  int rc = luamp_wait_fds(fds, (int)n, deadline);
  if (rc < 0) raise_wait_failure(L, rc);
  lua_createtable(L, rc, 0);
  int k = 0;
  for (lua_Integer i = 0; i < n; i++) {
    if (fds[i].revents) {
      lua_pushinteger(L, fds[i].fd);
      lua_rawseti(L, -2, ++k);
    }
  }
  return 1;
}

int luamp_open_wait(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"time", l_time},
    {"sleep", l_sleep},
    {"wait_fds", l_wait_fds},
    {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return 0;
}
