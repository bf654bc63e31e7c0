/* test_embed_tasks.c — luamp.task coroutines driven by a host's own libuv loop.
 *
 * API.md, "Embedding (C)": with a shared loop (luamp_set_loop) tasks are resumed from the
 * host's uv_run; the host never calls luamp.run or luamp.poll. The host here starts
 * tasks that sleep, wait on a Queue fed by a child process, wait on an Event (a futex,
 * through the bridge) and on each other, then only runs its loop with a timer of its
 * own; the loop ends when the tasks are done (their watches keep it alive until then),
 * the host's timer keeps ticking meanwhile and is never nested inside a luamp call.
 * "Ticking meanwhile" is shown by events, not by counting ticks in a fixed time (a loaded
 * machine may run the process only a few times in 200 ms): the host's fifth tick makes
 * an eventfd readable, and the Event and the child's Queue item that the other tasks
 * wait for come only after a task saw it. A luamp wait that held the loop up would
 * stop the ticks and every one of those waits would run into its timeout. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include <uv.h>

#include "luamp.h"

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
  fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } } while (0)

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct host {
  uv_timer_t timer;
  int ticks, depth, max_depth;
  int tick_fd;              /* readable from the fifth tick on */
  double deadline;
} host;

static void on_tick(uv_timer_t *t) {
  host *H = t->data;
  H->depth++;
  if (H->depth > H->max_depth) H->max_depth = H->depth;
  H->ticks++;
  if (H->ticks == 5) {
    uint64_t one = 1;
    if (write(H->tick_fd, &one, sizeof one) != sizeof one) H->deadline = 0;
  }
  if (now() > H->deadline) uv_stop(t->loop);
  H->depth--;
}

static const char *const SETUP =
  "local luamp = require 'luamp'\n"
  "log = {}\n"
  "local tick_fd = ...\n"
  "local q, ev, go = luamp.Queue(), luamp.Event(), luamp.Event()\n"
  "local p = luamp.Process{target = function() if go:wait(20) then q:put('from the child') end end}\n"
  "p:start()\n"
  "local sleeper = luamp.task(function() luamp.sleep(0.2); return 'slept' end)\n"
  "local function note(s) log[#log + 1] = s end\n"
  "luamp.task(function() note(q:get(true, 10)); p:join(10) end)\n"
  "luamp.task(function() note(ev:wait(10) and 'event') end)\n"
  "luamp.task(function()\n"
  "  note(#luamp.wait({tick_fd}, 10) == 1 and 'ticked')\n"
  "  ev:set(); go:set()\n"
  "end)\n"
  "luamp.task(function() note(sleeper:wait(10)) end)\n";

static void test_tasks_on_host_loop(void) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  luamp_set_loop(&loop);
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  host H;
  memset(&H, 0, sizeof H);
  H.tick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  CHECK(H.tick_fd >= 0, "eventfd failed");
  if (luaL_loadstring(L, SETUP) != LUA_OK ||
      (lua_pushinteger(L, H.tick_fd), lua_pcall(L, 1, 0, 0)) != LUA_OK) {
    CHECK(0, "setup: %s", lua_tostring(L, -1));
    return;
  }
  H.deadline = now() + 20;
  uv_timer_init(&loop, &H.timer);
  H.timer.data = &H;
  uv_timer_start(&H.timer, on_tick, 10, 10);
  uv_unref((uv_handle_t *)&H.timer);   /* only the tasks keep the loop alive */
  double t0 = now();
  uv_run(&loop, UV_RUN_DEFAULT);
  double took = now() - t0;
  CHECK(took < 10, "the host's loop ran %.1f s (the tasks never finished?)", took);
  CHECK(H.ticks >= 5, "the host's timer ticked %d times while the tasks waited", H.ticks);
  CHECK(H.max_depth == 1, "the host's timer nested %d deep", H.max_depth);
  if (luaL_dostring(L,
        "table.sort(log)\n"
        "assert(#log == 4, 'log has ' .. #log .. ' entries: ' .. table.concat(log, ','))\n"
        "assert(log[1] == 'event' and log[2] == 'from the child' and log[3] == 'slept' and\n"
        "       log[4] == 'ticked', table.concat(log, ','))\n"
        "assert(luamp._core.task_count() == 0)\n") != LUA_OK)
    CHECK(0, "tasks: %s", lua_tostring(L, -1));
  lua_close(L);
  close(H.tick_fd);
  uv_close((uv_handle_t *)&H.timer, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  luamp_set_loop(NULL);
  CHECK(uv_loop_close(&loop) == 0, "luamp left handles on the host's loop");
}

int main(void) {
  test_tasks_on_host_loop();
  if (failures) return 1;
  puts("test_embed_tasks: ok");
  return 0;
}
