/* test_embed_loop.c — luamp inside a host that runs a libuv loop of its own.
 *
 * The rule under test (API.md, "Embedding (C)"): luamp never runs the host's loop (uv_run
 * is not re-entrant) and never takes uv_default_loop() unasked; a blocking luamp call made
 * from a host callback blocks that callback and nothing else; with a shared loop
 * (luamp_set_loop) pool callbacks arrive through the host's own uv_run, the host never
 * calling luamp.poll. Each host counts how deeply its timer callback is nested: a luamp
 * call that ran the host's loop would show up as a depth above 1. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include <uv.h>

#include "luamp.h"
#include "internal.h"   /* only for the private loop's re-entrance guard */

#include "test_util.h"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static lua_State *new_state(const char *src) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  if (luaL_dostring(L, src) != LUA_OK) {
    CHECK(0, "setup chunk failed: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  return L;
}

/* ---- a host whose repeating timer calls into luamp ------------------------------------- */

#define CALLS 12

typedef struct host {
  uv_loop_t *loop;
  uv_timer_t timer;
  lua_State *L;
  int depth, max_depth;
  int calls, ok_calls;
  int foreign_handles;      /* handles on the host's loop that are not the host's own */
  char err[256];
} host;

static void count_foreign(uv_handle_t *h, void *arg) {
  host *H = arg;
  if (h != (uv_handle_t *)&H->timer) H->foreign_handles++;
}

/* Calls the Lua global tick(): a blocking luamp call (subprocess.run) returning 0. */
static void on_host_timer(uv_timer_t *t) {
  host *H = t->data;
  H->depth++;
  if (H->depth > H->max_depth) H->max_depth = H->depth;
  if (H->calls < CALLS) {
    H->calls++;
    lua_getglobal(H->L, "tick");
    if (lua_pcall(H->L, 0, 1, 0) == LUA_OK) {
      if (lua_tointeger(H->L, -1) == 0) H->ok_calls++;
      else snprintf(H->err, sizeof H->err, "tick returned %s", luaL_tolstring(H->L, -1, NULL));
    } else {
      snprintf(H->err, sizeof H->err, "%s", luaL_tolstring(H->L, -1, NULL));
    }
    lua_settop(H->L, 0);
    uv_walk(H->loop, count_foreign, H);
  }
  if (H->calls >= CALLS) uv_timer_stop(&H->timer);
  H->depth--;
}

static const char *const TICK_SRC =
  "function tick() return luamp.subprocess.run{'true'}.returncode end";

static void run_timer_host(host *H, uv_loop_t *loop) {
  memset(H, 0, sizeof *H);
  H->loop = loop;
  H->L = new_state(TICK_SRC);
  uv_timer_init(loop, &H->timer);
  H->timer.data = H;
  uv_timer_start(&H->timer, on_host_timer, 1, 1);
  uv_run(loop, UV_RUN_DEFAULT);
  lua_close(H->L);
  uv_close((uv_handle_t *)&H->timer, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
}

static void check_timer_host(const host *H, const char *what) {
  CHECK(H->calls == CALLS, "%s: %d calls of the timer callback, expected %d", what, H->calls, CALLS);
  CHECK(H->ok_calls == H->calls, "%s: %d of %d calls succeeded (%s)", what, H->ok_calls, H->calls, H->err);
  CHECK(H->max_depth == 1, "%s: the host's timer callback nested %d deep inside a luamp call",
        what, H->max_depth);
  CHECK(H->foreign_handles == 0, "%s: luamp left %d handles on the host's loop", what, H->foreign_handles);
}

/* (a) The host shares its (private) loop with luamp_set_loop. */
static void test_shared_loop_not_reentered(void) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  luamp_set_loop(&loop);
  host H;
  run_timer_host(&H, &loop);
  luamp_set_loop(NULL);
  check_timer_host(&H, "shared loop");
  CHECK(uv_loop_close(&loop) == 0, "shared loop: luamp left handles on it after lua_close");
}

/* (b) The host runs on uv_default_loop() and never told luamp about it. */
static void test_default_loop_untouched(void) {
  uv_loop_t *loop = uv_default_loop();
  host H;
  run_timer_host(&H, loop);
  check_timer_host(&H, "default loop");
  CHECK(!uv_loop_alive(loop), "default loop: still alive after the host's work");
}

/* ---- pool callbacks through the host's uv_run -------------------------------------------- */

#define TASKS 10
#define STR(x) #x
#define XSTR(x) STR(x)

typedef struct pool_host {
  uv_timer_t timer;
  lua_State *L;
  double deadline;
  int depth, max_depth;
  int got;
} pool_host;

/* The host's own periodic work: it only looks at how many callbacks have arrived. */
static void on_pool_host_timer(uv_timer_t *t) {
  pool_host *P = t->data;
  P->depth++;
  if (P->depth > P->max_depth) P->max_depth = P->depth;
  lua_getglobal(P->L, "got");
  P->got = (int)luaL_len(P->L, -1);
  lua_pop(P->L, 1);
  if (P->got >= TASKS || now() > P->deadline) uv_timer_stop(&P->timer);
  P->depth--;
}

/* (c) Pool callbacks arrive while the host runs its loop, with no luamp.poll call. */
static void test_pool_callbacks_through_host_loop(void) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  luamp_set_loop(&loop);
  pool_host P;
  memset(&P, 0, sizeof P);
  P.L = new_state(
    "got = {}\n"
    "pool = luamp.Pool{processes = 2}\n"
    "for i = 1, " XSTR(TASKS) " do\n"
    "  pool:apply_async(function(x) return x * 2 end, {i},\n"
    "    {callback = function(r) got[#got + 1] = r end})\n"
    "end\n");
  uv_timer_init(&loop, &P.timer);
  P.timer.data = &P;
  P.deadline = now() + 10;
  uv_timer_start(&P.timer, on_pool_host_timer, 5, 5);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(P.got == TASKS, "pool: %d of %d callbacks arrived through the host's loop", P.got, TASKS);
  CHECK(P.max_depth == 1, "pool: the host's timer callback nested %d deep", P.max_depth);
  if (luaL_dostring(P.L,
        "table.sort(got)\n"
        "for i = 1, #got do assert(got[i] == 2 * i, 'result ' .. i) end\n"
        "pool:close(); pool:join()") != LUA_OK) {
    CHECK(0, "pool: %s", lua_tostring(P.L, -1));
  }
  lua_close(P.L);
  uv_close((uv_handle_t *)&P.timer, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  luamp_set_loop(NULL);
  CHECK(uv_loop_close(&loop) == 0, "pool: luamp left handles on the host's loop after lua_close");
}

/* ---- a stale readiness hint on the host's loop ------------------------------------------ */

typedef struct stale_host {
  uv_pipe_t own;            /* the host's own pipe, made ready just before luamp's fd */
  int own_fds[2];
  lua_State *L;
} stale_host;

/* The host's callback runs first in the iteration and drains luamp's fd through
 * luamp.poll(): the readiness the loop already reported for that fd is now stale. */
static void on_own_readable(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  stale_host *S = s->data;
  (void)buf;
  if (n > 0 && luaL_dostring(S->L, "luamp.poll()") != LUA_OK) {
    CHECK(0, "stale: %s", lua_tostring(S->L, -1));
    lua_pop(S->L, 1);
  }
  uv_close((uv_handle_t *)s, NULL);
}

static void on_own_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *out) {
  static char byte[16];
  (void)h;
  (void)suggested;
  *out = uv_buf_init(byte, sizeof byte);
}

/* (d) A pump whose fd was drained earlier in the same iteration of the host's loop is not
 * run on the loop's stale report (it would read with nothing there: a blocking read). */
static void test_stale_readiness_on_host_loop(void) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  luamp_set_loop(&loop);
  stale_host S;
  memset(&S, 0, sizeof S);
  S.L = new_state(
    "local core = require 'luamp._core'\n"
    "a, b = luamp.Pipe()\n"
    "runs, stale = 0, 0\n"
    "core.pump_add(a:fileno(), function()\n"
    "  if not a:poll() then stale = stale + 1; return end\n"
    "  runs = runs + 1; a:recv_bytes()\n"
    "end)\n");
  if (pipe(S.own_fds) < 0) { CHECK(0, "pipe"); return; }
  uv_pipe_init(&loop, &S.own, 0);
  uv_pipe_open(&S.own, S.own_fds[0]);
  S.own.data = &S;
  uv_read_start((uv_stream_t *)&S.own, on_own_alloc, on_own_readable);
  uv_run(&loop, UV_RUN_NOWAIT);   /* both fds now in the loop's epoll set */
  /* epoll reports fds in the order they became ready: the host's first */
  if (write(S.own_fds[1], "x", 1) != 1) CHECK(0, "write");
  if (luaL_dostring(S.L, "b:send_bytes('m')") != LUA_OK) CHECK(0, "send: %s", lua_tostring(S.L, -1));
  uv_run(&loop, UV_RUN_NOWAIT);
  uv_run(&loop, UV_RUN_NOWAIT);
  lua_getglobal(S.L, "runs");
  lua_getglobal(S.L, "stale");
  CHECK(lua_tointeger(S.L, -2) == 1, "stale: the pump ran %d times, expected once", (int)lua_tointeger(S.L, -2));
  CHECK(lua_tointeger(S.L, -1) == 0, "stale: the pump ran %d times with nothing to read", (int)lua_tointeger(S.L, -1));
  lua_close(S.L);
  close(S.own_fds[1]);
  uv_run(&loop, UV_RUN_DEFAULT);
  luamp_set_loop(NULL);
  CHECK(uv_loop_close(&loop) == 0, "stale: handles left on the host's loop");
}

/* ---- the private loop ------------------------------------------------------------------ */

static int inner_step;

static void on_private_timer(uv_timer_t *t) {
  inner_step = luamp_private_loop_step();
  uv_close((uv_handle_t *)t, NULL);
}

/* (e) A step of luamp's private loop asked for from inside that loop's run refuses. */
static void test_private_loop_not_reentered(void) {
  uv_loop_t *loop = luamp_private_loop();
  CHECK(loop && loop != uv_default_loop(), "the private loop is libuv's default loop");
  if (!loop) return;
  uv_timer_t t;
  uv_timer_init(loop, &t);
  uv_timer_start(&t, on_private_timer, 0, 0);
  inner_step = 1;
  for (int i = 0; i < 100 && inner_step == 1; i++) CHECK(luamp_private_loop_step() == 0, "outer step refused");
  CHECK(inner_step == -1, "a step inside the private loop's run returned %d, expected -1", inner_step);
  luamp_private_loop_step();   /* lets the timer's close finish */
}

int main(void) {
  test_shared_loop_not_reentered();
  test_default_loop_untouched();
  test_pool_callbacks_through_host_loop();
  test_stale_readiness_on_host_loop();
  test_private_loop_not_reentered();
  return test_done("test_embed_loop");
}
