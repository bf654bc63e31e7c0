/*
 * wait.c — the runtime's clock and its one wait primitive.
 *
 * Every blocking call in luamp (join, recv, get, acquire, sleep...) ends up in
 * luamp_wait_fds(): wait until one of a set of fds is ready or a deadline passes. Having a
 * single place means signals are handled once (EINTR retried against the remaining time,
 * a pending Ctrl-C turned into Interrupted) and the coroutine scheduler can later swap
 * blocking for suspension here. Deadlines are absolute CLOCK_MONOTONIC seconds.
 *
 * Background pumps: a pump is an fd plus a Lua function to call when the fd is readable.
 * Every wait also watches the pump fds that are not in its own set, runs the functions
 * of the ready ones and then goes on waiting; luamp_pump_poll() does one non-blocking
 * round. This is how a Pool collects results, feeds its workers and runs callbacks while
 * the program is blocked in an unrelated call (q:get(), p:join(), sleep). The functions
 * run under lua_pcall on one Lua thread per state (anchored in the registry), so no error
 * ever unwinds through a waiting C frame; a pump is never re-entered from a wait inside
 * its own function; one whose function raises is dropped (it would otherwise spin),
 * except that an Interrupted error is handed on to the enclosing wait (which raises it
 * even when its own fds are ready). Pumps belong to the process that registered them: a
 * forked child's waits ignore the inherited ones. When a host shares its libuv loop, each
 * pump fd is also watched on that loop (loop.c), so pumps run from the host's own uv_run
 * through luamp_pump_run_if_ready.
 *
 * The readiness a wait reports is a hint: the pumps it ran after its poll may have read
 * those very fds (a wait inside a pump runs the other pumps, the waiting caller's own
 * among them), so a reader acting on it must read without blocking and go back to
 * waiting when it finds nothing.
 */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

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

/* Milliseconds to pass to poll() for a deadline; rounds up so we never wake early, and
 * never more than LUAMP_WAIT_SLICE: a Ctrl-C whose handler runs after a wait looked for a
 * pending interrupt but before poll() entered the kernel interrupts nothing, so the mark
 * is looked at again at least that often. */
static int remaining_ms(double deadline) {
  if (deadline < 0) return (int)(LUAMP_WAIT_SLICE * 1000);
  double left = deadline - luamp_now();
  if (left <= 0) return 0;
  double ms = ceil(left * 1000.0);
  return ms > LUAMP_WAIT_SLICE * 1000 ? (int)(LUAMP_WAIT_SLICE * 1000) : (int)ms;
}

/* ---- background pumps ------------------------------------------------------------------ */

typedef struct pump {
  int fd;
  unsigned id;          /* unique per registration: survives fd reuse while a pump runs */
  lua_State *thread;    /* the state's pump thread; the function is registry[ref] */
  int ref;
  int busy;
} pump;

static pump *pumps;
static int npumps, pumps_cap;
static unsigned pump_next_id;
static pid_t pumps_pid;       /* the process the registrations belong to */
static int pump_depth;        /* pump functions running (nested) */

/* The task scheduler (sched.c, which calls into this file and so cannot be called from
 * it by name) hands itself in here from its opener. */
const luamp_wait_scheduler *luamp_wait_sched;

static int sched_active(void) { return luamp_wait_sched && luamp_wait_sched->active(); }
static int sched_in_task(void) { return luamp_wait_sched && luamp_wait_sched->in_task(); }

static int pumps_active(void) {
  if (npumps == 0) return 0;
  if (pumps_pid != luamp_self_pid()) {
    /* inherited through fork: the Lua side of these belongs to the parent's program */
    npumps = 0;
    return 0;
  }
  return 1;
}

static pump *pump_by_fd(int fd) {
  for (int i = 0; i < npumps; i++)
    if (pumps[i].fd == fd) return &pumps[i];
  return NULL;
}

static pump *pump_by_id(unsigned id) {
  for (int i = 0; i < npumps; i++)
    if (pumps[i].id == id) return &pumps[i];
  return NULL;
}

static void pump_drop(pump *p) {
  luamp_host_unwatch(p->fd);
  luaL_unref(p->thread, LUA_REGISTRYINDEX, p->ref);
  *p = pumps[--npumps];
}

/* Reports an error raised by a pump function; returns 1 if the pump should be dropped. */
static int pump_failed(lua_State *T) {
  int interrupted = 0;
  if (lua_type(T, -1) == LUA_TTABLE) {
    lua_getfield(T, -1, "kind");
    const char *kind = lua_tostring(T, -1);
    interrupted = kind && strcmp(kind, "Interrupted") == 0;
    lua_pop(T, 1);
  }
  if (interrupted) {
    luamp_request_interrupt();
    return 0;
  }
  fprintf(stderr, "luamp: error in a background callback (dropped): %s\n",
          luaL_tolstring(T, -1, NULL));
  fflush(stderr);
  return 1;
}

/* Runs the function of the pump on fd, unless it is gone or already running. */
static void pump_run(int fd) {
  pump *p = pump_by_fd(fd);
  if (!p || p->busy) return;
  lua_State *T = p->thread;
  unsigned id = p->id;
  p->busy = 1;
  int base = lua_gettop(T);
  int drop = 0;
  if (!lua_checkstack(T, 3)) {
    drop = 1;
  } else {
    lua_rawgeti(T, LUA_REGISTRYINDEX, p->ref);
    lua_pushinteger(T, fd);
    pump_depth++;
    if (lua_pcall(T, 1, 0, 0) != LUA_OK) drop = pump_failed(T);
    pump_depth--;
  }
  lua_settop(T, base);
  /* the function may have added or removed pumps: find ours again */
  p = pump_by_id(id);
  if (!p) return;
  p->busy = 0;
  if (drop) pump_drop(p);
}

/* Runs the ready pumps among fds[from..n). */
static int pumps_run_ready(struct pollfd *fds, int from, int n) {
  int ran = 0;
  for (int i = from; i < n; i++) {
    if (!fds[i].revents) continue;
    pump_run(fds[i].fd);
    ran++;
  }
  return ran;
}

static int in_caller_set(const struct pollfd *fds, int nfds, int fd) {
  for (int i = 0; i < nfds; i++)
    if (fds[i].fd == fd) return 1;
  return 0;
}

/* Appends to all[] (which holds the caller's nfds first) the idle pumps not in the
 * caller's set; returns the new count. */
static int add_pump_fds(struct pollfd *all, int nfds) {
  int n = nfds;
  for (int i = 0; i < npumps; i++) {
    if (pumps[i].busy || in_caller_set(all, nfds, pumps[i].fd)) continue;
    all[n].fd = pumps[i].fd;
    all[n].events = POLLIN;
    all[n].revents = 0;
    n++;
  }
  return n;
}

/* For the scheduler's wait (sched.c), which polls pump fds beside the tasks' own. */
int luamp_pump_running(void) { return pump_depth; }
int luamp_pump_count(void) { return pumps_active() ? npumps : 0; }
int luamp_pump_fill(struct pollfd *all, int nfds) { return pumps_active() ? add_pump_fds(all, nfds) : nfds; }
void luamp_pump_dispatch(struct pollfd *all, int from, int n) { pumps_run_ready(all, from, n); }

int luamp_pump_poll(void) {
  /* inside a task the pumps are left to the main context's waits: a pump function that
   * waited would suspend the task halfway through a call on the one pump thread, which
   * another pump must not then run on */
  if (!pumps_active() || sched_in_task()) return 0;
  struct pollfd stackfds[32];
  struct pollfd *fds = npumps <= 32 ? stackfds : malloc(sizeof *fds * (size_t)npumps);
  if (!fds) return 0;
  int n = add_pump_fds(fds, 0), ran = 0, r;
  do r = poll(fds, (nfds_t)n, 0); while (r < 0 && errno == EINTR);
  if (r > 0) ran = pumps_run_ready(fds, 0, n);
  if (fds != stackfds) free(fds);
  return ran;
}

int luamp_pump_run_if_ready(int fd) {
  if (!pumps_active() || sched_in_task()) return 0;
  struct pollfd pfd = {.fd = fd, .events = POLLIN, .revents = 0};
  int r;
  do r = poll(&pfd, 1, 0); while (r < 0 && errno == EINTR);
  if (r <= 0) return 0;
  pump_run(fd);
  return 1;
}

/* A pump fd's watch on the host's loop fired: run the pump, and wake the tasks waiting
 * on that fd (a fd has one watch on a loop, so the scheduler has none of its own). */
static int pump_host_ready(int fd) {
  int ran = luamp_pump_run_if_ready(fd);
  if (luamp_wait_sched) luamp_wait_sched->host_fd_ready(fd);
  return ran;
}

/* poll() on the caller's fds alone; the whole wait when no pump is registered. */
static int wait_plain(struct pollfd *fds, int nfds, double deadline) {
  for (;;) {
    if (luamp_interrupt_pending()) return -2;
    int ms = remaining_ms(deadline);
    int n = poll(fds, (nfds_t)nfds, ms);
    if (n >= 0) {
      /* a slice ended (see remaining_ms), or poll's millisecond granularity woke us a
       * hair early on a pure timeout */
      if (n == 0 && (deadline < 0 || luamp_now() < deadline)) continue;
      return n;
    }
    if (errno != EINTR) return -1;
  }
}

/* One poll over the caller's fds and the pumps', then runs the ready pumps (counted in
 * *pumps_ran). Returns the number of ready caller fds (revents copied back), 0 when none
 * was, -1 with errno. */
static int wait_round(struct pollfd *fds, int nfds, int ms, int *pumps_ran) {
  struct pollfd stackfds[64];
  int total = nfds + npumps;
  struct pollfd *all = total <= 64 ? stackfds : malloc(sizeof *all * (size_t)total);
  if (!all) {
    /* no memory for the combined set: wait for the caller's fds alone this round */
    int r = poll(fds, (nfds_t)nfds, ms);
    return r;
  }
  if (nfds) memcpy(all, fds, sizeof *all * (size_t)nfds);
  int n = add_pump_fds(all, nfds);
  int r = poll(all, (nfds_t)n, ms);
  int saved = errno;
  if (r > 0) {
    r = 0;
    for (int i = 0; i < nfds; i++) {
      fds[i].revents = all[i].revents;
      if (fds[i].revents) r++;
    }
    *pumps_ran = pumps_run_ready(all, nfds, n);
  }
  if (all != stackfds) free(all);
  errno = saved;
  return r;
}

int luamp_wait_is_plain(void) { return !sched_active() && !pumps_active(); }

int luamp_wait_fds(struct pollfd *fds, int nfds, double deadline) {
  /* inside a task, or with tasks to run meanwhile: the scheduler waits (sched.c) */
  if (sched_active()) return luamp_wait_sched->wait_fds(fds, nfds, deadline);
  for (int i = 0; i < nfds; i++) fds[i].events &= (short)~LUAMP_POLL_ONE;
  if (!pumps_active()) return wait_plain(fds, nfds, deadline);
  for (;;) {
    if (luamp_interrupt_pending()) return -2;
    int ms = remaining_ms(deadline);
    int ran = 0;
    int n = wait_round(fds, nfds, ms, &ran);
    /* a pump that met a Ctrl-C handed it on: it wins over the caller's readiness */
    if (luamp_interrupt_pending()) return -2;
    if (n > 0) return n;
    if (n < 0) {
      if (errno != EINTR) return -1;
      continue;
    }
    (void)ran;
    if (deadline >= 0 && luamp_now() >= deadline) return 0;
    if (!pumps_active()) return wait_plain(fds, nfds, deadline);
  }
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

/* The state's pump thread, made on first use and anchored in the registry. */
static lua_State *pump_thread(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, "luamp.pump_thread") == LUA_TTHREAD) {
    lua_State *T = lua_tothread(L, -1);
    lua_pop(L, 1);
    return T;
  }
  lua_pop(L, 1);
  lua_State *T = lua_newthread(L);
  lua_setfield(L, LUA_REGISTRYINDEX, "luamp.pump_thread");
  return T;
}

/* pump_add(fd, fn): fn(fd) is called when fd is readable during any wait (replaces an
 * earlier registration of fd). */
static int l_pump_add(lua_State *L) {
  lua_Integer fd = luaL_checkinteger(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (fd < 0 || fd > INT32_MAX) luamp_raise(L, "Value", "pump_add: bad file descriptor");
  pumps_active();   /* forget inherited registrations */
  lua_State *T = pump_thread(L);
  pump *p = pump_by_fd((int)fd);
  if (!p) {
    if (npumps == pumps_cap) {
      int cap = pumps_cap ? pumps_cap * 2 : 16;
      pump *grown = realloc(pumps, sizeof *grown * (size_t)cap);
      if (!grown) luamp_raise(L, "Value", "pump_add: out of memory");
      pumps = grown;
      pumps_cap = cap;
    }
    p = &pumps[npumps++];
    p->fd = (int)fd;
    p->busy = 0;
  } else {
    luaL_unref(p->thread, LUA_REGISTRYINDEX, p->ref);
  }
  lua_pushvalue(L, 2);
  p->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  p->thread = T;
  p->id = ++pump_next_id;
  pumps_pid = luamp_self_pid();
  luamp_host_watch((int)fd, pump_host_ready);
  return 0;
}

/* pump_remove(fd): no-op when fd has no pump. */
static int l_pump_remove(lua_State *L) {
  lua_Integer fd = luaL_checkinteger(L, 1);
  if (!pumps_active()) return 0;
  pump *p = pump_by_fd((int)fd);
  if (p) pump_drop(p);
  return 0;
}

/* pump_poll() -> number of pumps that ran: one non-blocking round. A Ctrl-C a pump met
 * (no wait follows to report it) is raised here. */
static int l_pump_poll(lua_State *L) {
  int ran = luamp_pump_poll();
  if (luamp_take_interrupt()) luamp_raise(L, "Interrupted", "interrupted");
  lua_pushinteger(L, ran);
  return 1;
}

/* When a state closes, its pumps go with it (their thread is about to be freed). */
static int pump_guard_gc(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, "luamp.pump_thread") != LUA_TTHREAD) return 0;
  lua_State *T = lua_tothread(L, -1);
  for (int i = 0; i < npumps;) {
    if (pumps[i].thread == T) pump_drop(&pumps[i]);
    else i++;
  }
  return 0;
}

int luamp_open_wait(lua_State *L) {
  luamp_on_close(L, "luamp.pump_guard", pump_guard_gc);
  static const luaL_Reg fns[] = {
    {"pump_add", l_pump_add},
    {"pump_remove", l_pump_remove},
    {"pump_poll", l_pump_poll},
    {"time", l_time},
    {"sleep", l_sleep},
    {"wait_fds", l_wait_fds},
    {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return 0;
}
