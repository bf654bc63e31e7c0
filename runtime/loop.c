/*
 * loop.c — the libuv loops luamp touches, and the rule that keeps a host's loop safe.
 * Part of the base layer (base.h): it calls only base.c, and reaches the files above it
 * through what they hand it (a watch's ready callback) and its own fork hook.
 *
 * The rule: luamp runs only its own private loop, and never re-entrantly; it never runs
 * the host's loop (uv_run is not re-entrant: a blocking luamp call made from a host's
 * callback would run the host's other callbacks inside it, nesting without bound) and
 * never takes uv_default_loop(), which may belong to a host that did not say so.
 *
 * - The private loop (made on first use) holds the handles of luamp's own blocking
 *   waits: a subprocess's pipes, timers and end watch. When it is made it registers a
 *   fork hook (base.h) that re-makes a forked child's copy (uv_loop_fork). Only
 *   luamp_private_loop_step runs it, one non-blocking iteration at a time, and refuses
 *   to run it from inside itself. Nesting cannot arise in practice (its callbacks are C
 *   that never calls Lua, so no luamp wait starts inside them); the guard turns a future
 *   slip into an error instead of corrupt libuv state.
 * - A host's loop, given with luamp_set_loop, is only ever handed handles: one uv_poll
 *   per background pump fd (wait.c, which passes the function that runs the pump), so
 *   that pool results and callbacks arrive while the host runs its own loop. They are
 *   unref'd, never keeping the host's uv_run going, and closed when the pump goes (at
 *   the latest when the Lua state closes). Their callback runs the pump only if its fd
 *   is still ready: a luamp wait in an earlier callback of the same iteration may have
 *   drained it, and a stale hint must not lead to a blocking read. Watches belong to the
 *   process that set the loop: a forked child (which never runs the host's loop) leaves
 *   the inherited ones alone.
 */
#include <errno.h>
#include <stdlib.h>

#include <uv.h>

#include "base.h"
#include "luamp.h"

/* ---- the private loop ------------------------------------------------------------------ */

static uv_loop_t private_loop;
static int private_loop_made;
static int private_loop_running;

/* In a new child: the copy of the parent's loop (epoll set, signal pipe) must be made its
 * own before a subprocess can be used here. */
static void private_loop_after_fork(void) {
  if (private_loop_running) private_loop_running = 0;
  if (private_loop_made) uv_loop_fork(&private_loop);
}

uv_loop_t *luamp_private_loop(void) {
  if (!private_loop_made) {
    if (uv_loop_init(&private_loop) < 0) return NULL;
    private_loop_made = 1;
    luamp_atfork(NULL, NULL, private_loop_after_fork);
  }
  return &private_loop;
}

int luamp_private_loop_step(void) {
  if (private_loop_running || !private_loop_made) return -1;
  private_loop_running = 1;
  uv_run(&private_loop, UV_RUN_NOWAIT);
  private_loop_running = 0;
  return 0;
}

int luamp_private_loop_running(void) { return private_loop_running; }

/* Whoever steps the private loop runs every callback due, its own or another waiter's:
 * the callbacks count here, so that the task scheduler wakes the tasks waiting on the
 * loop to look again (a step in one task takes the events another task waits for). */
static unsigned private_loop_events;
void luamp_private_loop_note(void) { private_loop_events++; }
unsigned luamp_private_loop_events(void) { return private_loop_events; }
int luamp_private_loop_fd(void) { return private_loop_made ? uv_backend_fd(&private_loop) : -1; }

/* ---- the host's loop: pump watches ------------------------------------------------------ */

typedef struct host_watch {
  uv_poll_t poll;
  int fd;
  int (*ready)(int fd);
  struct host_watch *next;
} host_watch;

static uv_loop_t *host_loop;
static pid_t host_pid;           /* the process that set the loop: only it adds watches */
static host_watch *watches;

void luamp_set_loop(uv_loop_t *loop) {
  host_loop = loop;
  host_pid = luamp_self_pid();
}

static int host_watches_ours(void) {
  if (host_pid == luamp_self_pid()) return 1;
  watches = NULL;   /* a forked copy: the parent's loop and handles are not ours to touch */
  return 0;
}

uv_loop_t *luamp_host_loop(void) { return host_loop && host_watches_ours() ? host_loop : NULL; }

static void on_watch_closed(uv_handle_t *h) { free(h->data); }

static void on_pump_ready(uv_poll_t *h, int status, int events) {
  (void)status;   /* an error (a closed fd) is for the pump to find by reading */
  (void)events;
  host_watch *w = h->data;
  w->ready(w->fd);
}

void luamp_host_unwatch(int fd) {
  if (!host_watches_ours()) return;
  for (host_watch **pw = &watches; *pw; pw = &(*pw)->next) {
    host_watch *w = *pw;
    if (w->fd != fd) continue;
    *pw = w->next;
    /* closing a poll handle takes its fd out of the loop's epoll set at once, so the fd
     * may be closed (and its number reused) right after */
    uv_close((uv_handle_t *)&w->poll, on_watch_closed);
    return;
  }
}

void luamp_host_watch(int fd, int (*ready)(int fd)) {
  if (!host_loop || !host_watches_ours()) return;
  /* a fresh watch every time: fd may be a new file under an old number */
  luamp_host_unwatch(fd);
  host_watch *w = malloc(sizeof *w);
  if (!w) return;   /* the pump still runs in luamp's own waits */
  if (uv_poll_init(host_loop, &w->poll, fd) < 0) {
    free(w);
    return;
  }
  w->poll.data = w;
  w->fd = fd;
  w->ready = ready;
  uv_poll_start(&w->poll, UV_READABLE, on_pump_ready);
  uv_unref((uv_handle_t *)&w->poll);
  w->next = watches;
  watches = w;
}
