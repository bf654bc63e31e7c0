/*
 * subprocess.c — external programs, run in luamp's libuv loop.
 *
 * A "luamp.Subprocess" handle owns one child, up to three pipes to it (uv_pipe_t), a
 * uv_timer_t for timeouts and a watch on the child's end, all in luamp's private loop
 * (loop.c: never a host's loop, so a wait here never runs a host's callbacks). Their C
 * state is malloc'd apart from the Lua userdata because libuv finishes closing a handle
 * only in a later loop iteration: the state frees itself when the last of its handles
 * has been through its close callback.
 *
 * The child is started with posix_spawn rather than uv_spawn: libuv 1.44 forks, and
 * copying the parent's page tables made every spawn ~1.6x slower than posix_spawn's
 * vfork-style clone (scripts/bench/subprocess.sh). Its end is watched through a pidfd
 * polled in the loop (uv_poll_t; a 10 ms timer where pidfds are missing) and reaped with
 * waitpid(pid): never waitpid(-1) and no SIGCHLD handler, so luamp's Process reaping
 * and this never take each other's children, nor anyone else's.
 *
 * Pipes are made here (pipe2, O_CLOEXEC) and dup'd onto the child's 0-2, so that stderr
 * can share stdout's pipe and programs see real pipes. Output arrives in per-stream
 * buffers; reading is switched on only while someone waits on this child, so a child
 * nobody reads from is held back by the pipe. While waiting on one stream the others keep
 * draining, which is why writing lots to a child that writes lots back never deadlocks.
 * Writes go straight to the pipe when it has room; the rest is queued in libuv, and a
 * writer blocks only beyond a high-water mark.
 *
 * Every blocking call waits the same way: run the loop without blocking, and if the
 * condition does not hold yet, wait for the loop's backend fd (with the loop's own
 * timeout) through luamp_wait_fds, the runtime's one wait primitive — so Ctrl-C and a
 * later scheduler see these waits too.
 *
 * A child whose handle Lua dropped while it ran stays watched (unref'd) until it ends,
 * so it does not linger as a zombie once the loop runs again. A handle inherited through
 * fork belongs to the parent: there it is only closed, never waited for or killed.
 *
 * Writing to a pipe whose reader is gone raises SIGPIPE, which would kill the program;
 * the writes done here (ours and libuv's inside uv_run) run with SIGPIPE blocked and any
 * SIGPIPE they caused is consumed, so the caller sees BrokenPipe instead.
 */
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "internal.h"

#define SUBPROCESS_MT "luamp.Subprocess"
#define READ_CHUNK 65536
#define WRITE_HIGH_WATER (256 * 1024)

extern char **environ;

enum { SP_IN = 0, SP_OUT = 1, SP_ERR = 2 };
static const char *const stream_names[] = {"stdin", "stdout", "stderr"};

typedef struct sp_state sp_state;

typedef struct stream {
  uv_pipe_t pipe;
  sp_state *st;
  int open;                /* the pipe handle exists and is not closing */
  int reading;             /* uv_read_start is in effect */
  int eof;                 /* read side: end of data (EOF or a read error) */
  int read_err;            /* a read error other than EOF (uv code), 0 if none */
  luamp_buf buf;            /* read side: bytes received; Lua has taken those before `taken` */
  size_t taken;
  size_t queued;           /* write side: bytes handed to uv_write, not yet written */
  int write_err;           /* write side: first failure (uv code), 0 if none */
  int close_when_drained;  /* write side: close once the queue is empty */
} stream;

struct sp_state {
  union {                  /* how the child's end is noticed: */
    uv_poll_t poll;        /*   its pidfd becoming readable */
    uv_timer_t tick;       /*   or, without pidfds (Linux < 5.3), a look every 10 ms */
  } watch;
  uv_timer_t timer;
  stream io[3];
  uv_loop_t *loop;
  pid_t owner;             /* the process that spawned the child: only it may wait or signal */
  pid_t pid;
  int handles;             /* handles not yet through their close callback */
  int pidfd;
  int watch_open, timer_open;
  int exited;
  int returncode;          /* exit status, or -signal */
  int group;               /* the child leads its own process group (session) */
  int timed_out;
  int comm_started;
};

typedef struct { sp_state *st; } sp_ud;

typedef struct wreq {
  uv_write_t req;
  stream *s;
  size_t len;
  char data[];
} wreq;

static int writes_in_flight;     /* queued writes in any state: uv_run may write (SIGPIPE) */


/* ---- SIGPIPE guard -------------------------------------------------------------------- */

typedef struct {
  sigset_t old;
  int was_pending;
} pipe_guard;

static void guard_enter(pipe_guard *g) {
  sigset_t set, pending;
  sigemptyset(&set);
  sigaddset(&set, SIGPIPE);
  sigpending(&pending);
  g->was_pending = sigismember(&pending, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &set, &g->old);
}

static void guard_leave(pipe_guard *g) {
  int saved = errno;
  if (!g->was_pending) {
    sigset_t set, pending;
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    sigpending(&pending);
    if (sigismember(&pending, SIGPIPE)) {
      struct timespec zero = {0, 0};
      while (sigtimedwait(&set, NULL, &zero) < 0 && errno == EINTR) {}
    }
  }
  pthread_sigmask(SIG_SETMASK, &g->old, NULL);
  errno = saved;
}

/* ---- buffers and handle lifetimes ----------------------------------------------------- */

/* Makes room to receive `need` more bytes, first sliding out what Lua has taken once that
 * is at least half the buffer. 0 ok, -1 out of memory. */
static int rbuf_reserve(stream *s, size_t need) {
  luamp_buf *b = &s->buf;
  if (s->taken == b->len) {
    s->taken = b->len = 0;
  } else if (b->cap - b->len < need && s->taken >= b->cap / 2) {
    memmove(b->data, b->data + s->taken, b->len - s->taken);
    b->len -= s->taken;
    s->taken = 0;
  }
  return luamp_buf_reserve(b, need);
}

/* The bytes received and not yet taken: their start, and how many. */
static const char *rbuf_data(const stream *s) {
  return s->buf.data ? s->buf.data + s->taken : "";
}
static size_t rbuf_len(const stream *s) { return s->buf.len - s->taken; }

static void state_unref(sp_state *st) {
  if (--st->handles > 0) return;
  for (int i = 0; i < 3; i++) luamp_buf_free(&st->io[i].buf);
  free(st);
}

static void on_handle_closed(uv_handle_t *h) { state_unref(h->data); }

static void on_pipe_closed(uv_handle_t *h) { state_unref(((stream *)h->data)->st); }

static void stream_close(stream *s) {
  if (!s->open) return;
  s->open = 0;
  s->reading = 0;
  uv_close((uv_handle_t *)&s->pipe, on_pipe_closed);
}

static void watch_close(sp_state *st) {
  if (!st->watch_open) return;
  st->watch_open = 0;
  uv_close((uv_handle_t *)&st->watch, on_handle_closed);
  /* a closed poll handle no longer watches the fd, so it may go now */
  luamp_close_fd(st->pidfd);
  st->pidfd = -1;
}

static void timer_close(sp_state *st) {
  if (!st->timer_open) return;
  st->timer_open = 0;
  uv_close((uv_handle_t *)&st->timer, on_handle_closed);
}

/* Runs one non-blocking iteration of the private loop: due timers, ready I/O, exits,
 * close callbacks. -1 (nothing run) when called from inside that loop's own run. */
static int loop_step(void) {
  pipe_guard g;
  int guarded = writes_in_flight > 0;
  if (guarded) guard_enter(&g);
  int rc = luamp_private_loop_step();
  if (guarded) guard_leave(&g);
  return rc;
}

/* ---- libuv callbacks ------------------------------------------------------------------ */

/* Reaps the child if it has ended: by pid, never waitpid(-1), so no one else's child is
 * taken. Only the process that spawned it may; a forked copy just stops watching. */
static void try_reap(sp_state *st) {
  if (st->exited) return;
  if (st->owner != luamp_self_pid()) { watch_close(st); return; }
  int status;
  pid_t r;
  do r = waitpid(st->pid, &status, WNOHANG); while (r < 0 && errno == EINTR);
  if (r == 0) return;
  st->exited = 1;
  if (r < 0) st->returncode = 255;   /* reaped behind our back (SIGCHLD ignored): status lost */
  else if (WIFSIGNALED(status)) st->returncode = -WTERMSIG(status);
  else st->returncode = WEXITSTATUS(status);
  watch_close(st);
}

static void on_pidfd(uv_poll_t *h, int status, int events) {
  (void)status;
  (void)events;
  try_reap(h->data);
}

static void on_tick(uv_timer_t *t) { try_reap(t->data); }

static void on_timer(uv_timer_t *t) { ((sp_state *)t->data)->timed_out = 1; }

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *out) {
  (void)suggested;
  stream *s = h->data;
  if (rbuf_reserve(s, READ_CHUNK) < 0) {
    *out = uv_buf_init(NULL, 0);   /* libuv reports UV_ENOBUFS to on_read */
    return;
  }
  *out = uv_buf_init(s->buf.data + s->buf.len, (unsigned)(s->buf.cap - s->buf.len));
}

static void on_read(uv_stream_t *h, ssize_t n, const uv_buf_t *b) {
  (void)b;
  stream *s = h->data;
  if (n > 0) {
    s->buf.len += (size_t)n;
  } else if (n < 0) {
    s->eof = 1;
    if (n != UV_EOF) s->read_err = (int)n;
    uv_read_stop(h);
    s->reading = 0;
  }
}

static void on_write(uv_write_t *r, int status) {
  wreq *w = (wreq *)r;
  stream *s = w->s;
  s->queued -= w->len;
  writes_in_flight--;
  if (status < 0 && status != UV_ECANCELED && !s->write_err) s->write_err = status;
  free(w);
  if (s->close_when_drained && (s->queued == 0 || s->write_err)) stream_close(s);
}

/* ---- reading, writing, waiting -------------------------------------------------------- */

static void reads_start(sp_state *st) {
  for (int i = SP_OUT; i <= SP_ERR; i++) {
    stream *s = &st->io[i];
    if (s->open && !s->eof && !s->reading) {
      if (uv_read_start((uv_stream_t *)&s->pipe, on_alloc, on_read) == 0) s->reading = 1;
      else s->eof = 1;
    }
  }
}

static void reads_stop(sp_state *st) {
  for (int i = SP_OUT; i <= SP_ERR; i++) {
    stream *s = &st->io[i];
    if (s->open && s->reading) uv_read_stop((uv_stream_t *)&s->pipe);
    s->reading = 0;
  }
}

/* Writes what the pipe takes now and queues the rest. Returns 0 or a uv error code. */
static int stream_write(stream *s, const char *p, size_t len) {
  if (s->write_err) return s->write_err;
  if (len == 0) return 0;
  pipe_guard g;
  guard_enter(&g);
  int rc = 0;
  if (s->queued == 0) {
    uv_buf_t b = uv_buf_init((char *)p, (unsigned)(len > 1u << 30 ? 1u << 30 : len));
    int n = uv_try_write((uv_stream_t *)&s->pipe, &b, 1);
    if (n == UV_EAGAIN) n = 0;
    if (n < 0) rc = n;
    else { p += n; len -= (size_t)n; }
  }
  while (rc == 0 && len > 0) {
    size_t part = len > 1u << 30 ? 1u << 30 : len;   /* uv_buf_t lengths are unsigned int */
    wreq *w = malloc(sizeof *w + part);
    if (!w) { rc = UV_ENOMEM; break; }
    memcpy(w->data, p, part);
    w->s = s;
    w->len = part;
    uv_buf_t b = uv_buf_init(w->data, (unsigned)part);
    rc = uv_write(&w->req, (uv_stream_t *)&s->pipe, &b, 1, on_write);
    if (rc < 0) { free(w); break; }
    s->queued += part;
    writes_in_flight++;
    p += part;
    len -= part;
  }
  guard_leave(&g);
  if (rc < 0 && !s->write_err) s->write_err = rc;
  return rc;
}

typedef int (*done_fn)(sp_state *st, void *ctx);

enum { WAIT_DONE = 1, WAIT_TIMEOUT = 0, WAIT_FAILED = -1, WAIT_INTERRUPTED = -2, WAIT_STUCK = -3 };

/* Runs luamp's loop until done() holds or `timeout` seconds pass (timeout < 0: no limit).
 * Returns one of the WAIT_ codes. */
static int loop_wait(sp_state *st, done_fn done, void *ctx, double timeout) {
  uv_loop_t *loop = st->loop;
  st->timed_out = 0;
  if (timeout >= 0 && st->timer_open) {
    double ms = ceil(timeout * 1000.0);
    uv_update_time(loop);
    uv_timer_start(&st->timer, on_timer, ms > 1e15 ? (uint64_t)1e15 : (uint64_t)ms, 0);
  }
  int rc;
  for (;;) {
    if (loop_step() < 0) { errno = EDEADLK; rc = WAIT_FAILED; break; }
    if (done(st, ctx)) { rc = WAIT_DONE; break; }
    if (st->timed_out) { rc = WAIT_TIMEOUT; break; }
    if (!uv_loop_alive(loop)) { rc = WAIT_STUCK; break; }
    uv_update_time(loop);
    int ms = uv_backend_timeout(loop);
    struct pollfd pfd = {.fd = uv_backend_fd(loop), .events = POLLIN, .revents = 0};
    int n = luamp_wait_fds(&pfd, 1, ms < 0 ? -1 : luamp_now() + ms / 1000.0);
    if (n == -2) { rc = WAIT_INTERRUPTED; break; }
    if (n < 0) { rc = WAIT_FAILED; break; }
  }
  if (st->timer_open) uv_timer_stop(&st->timer);
  return rc;
}

/* Raises for a loop_wait result other than done and timeout. */
static void raise_wait(lua_State *L, int rc, const char *what) {
  if (rc == WAIT_INTERRUPTED) {
    luamp_take_interrupt();
    luamp_raise(L, "Interrupted", "interrupted while waiting for %s", what);
  }
  if (rc == WAIT_STUCK) luamp_raise(L, "Value", "%s: nothing left to wait for", what);
  luamp_raise_errno(L, "Value", what, errno);
}

static int done_exited(sp_state *st, void *ctx) {
  (void)ctx;
  return st->exited;
}

static int done_communicated(sp_state *st, void *ctx) {
  (void)ctx;
  for (int i = SP_OUT; i <= SP_ERR; i++)
    if (st->io[i].open && !st->io[i].eof) return 0;
  return !st->io[SP_IN].open && st->exited;
}

static int done_flushed(sp_state *st, void *ctx) {
  stream *s = &st->io[SP_IN];
  size_t limit = *(size_t *)ctx;
  return !s->open || s->write_err || s->queued <= limit;
}

typedef struct {
  stream *s;
  size_t want;       /* bytes wanted, for counted reads */
  size_t scanned;    /* line reads: bytes already searched for a newline */
  int line;
} read_ctx;

static int done_readable(sp_state *st, void *ctx) {
  (void)st;
  read_ctx *r = ctx;
  stream *s = r->s;
  if (s->eof || !s->open) return 1;
  size_t have = rbuf_len(s);
  if (!r->line) return have >= r->want;
  if (have > r->scanned && memchr(rbuf_data(s) + r->scanned, '\n', have - r->scanned))
    return 1;
  r->scanned = have;
  return 0;
}

/* ---- spawning ------------------------------------------------------------------------- */

enum { IO_INHERIT, IO_DEVNULL, IO_PIPE, IO_FD, IO_STDOUT };

typedef struct {
  int kind;
  int fd;          /* IO_FD: the fd to give the child */
} io_spec;

static sp_ud *check_ud(lua_State *L) { return luaL_checkudata(L, 1, SUBPROCESS_MT); }

static sp_state *check_state(lua_State *L) {
  sp_ud *u = check_ud(L);
  if (!u->st) luamp_raise(L, "Value", "subprocess handle is closed");
  return u->st;
}

static sp_state *check_own(lua_State *L) {
  sp_state *st = check_state(L);
  if (st->owner != luamp_self_pid())
    luamp_raise(L, "Value", "this subprocess belongs to another process (inherited through fork)");
  return st;
}

/* A string from the spec without embedded NULs (exec would silently cut it). */
static const char *spec_string(lua_State *L, int idx, const char *what) {
  size_t len;
  if (lua_type(L, idx) != LUA_TSTRING) luamp_raise(L, "Value", "%s must be a string", what);
  const char *s = lua_tolstring(L, idx, &len);
  if (strlen(s) != len) luamp_raise(L, "Value", "%s contains a zero byte", what);
  return s;
}

/* A NULL-terminated array of the strings in the list at spec[field], kept alive by the
 * spec table; the array itself is a userdata left on the stack. NULL if the field is nil. */
static char **spec_strings(lua_State *L, const char *field) {
  if (lua_getfield(L, 1, field) == LUA_TNIL) {
    lua_pop(L, 1);
    lua_pushnil(L);
    return NULL;
  }
  if (!lua_istable(L, -1)) luamp_raise(L, "Value", "%s must be a list of strings", field);
  int list = lua_gettop(L);
  lua_Integer n = luaL_len(L, list);
  if (n < 0 || n > 1 << 20) luamp_raise(L, "Value", "%s: too many strings", field);
  char **arr = lua_newuserdatauv(L, sizeof(char *) * ((size_t)n + 1), 0);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_geti(L, list, i);
    arr[i - 1] = (char *)spec_string(L, -1, field);
    lua_pop(L, 1);
  }
  arr[n] = NULL;
  lua_remove(L, list);   /* the spec still holds the list, and the list the strings */
  return arr;
}

static io_spec spec_io(lua_State *L, int i) {
  io_spec io = {IO_INHERIT, -1};
  lua_geti(L, -1, i + 1);
  if (lua_type(L, -1) == LUA_TSTRING) {
    const char *k = lua_tostring(L, -1);
    if (strcmp(k, "pipe") == 0) io.kind = IO_PIPE;
    else if (strcmp(k, "inherit") == 0) io.kind = IO_INHERIT;
    else if (strcmp(k, "devnull") == 0) io.kind = IO_DEVNULL;
    else if (strcmp(k, "stdout") == 0 && i == SP_ERR) io.kind = IO_STDOUT;
    else luamp_raise(L, "Value", "%s: unknown setting '%s'", stream_names[i], k);
  } else if (lua_isinteger(L, -1)) {
    lua_Integer fd = lua_tointeger(L, -1);
    if (fd < 0 || fd > INT32_MAX || fcntl((int)fd, F_GETFD) < 0)
      luamp_raise(L, "Value", "%s: %lld is not an open file descriptor", stream_names[i], (long long)fd);
    io.kind = IO_FD;
    io.fd = (int)fd;
  } else if (!lua_isnil(L, -1)) {
    luaL_Stream *f = luaL_testudata(L, -1, LUA_FILEHANDLE);
    if (!f) luamp_raise(L, "Value", "%s: expected \"pipe\", \"inherit\", \"devnull\", a file or an fd", stream_names[i]);
    if (!f->closef) luamp_raise(L, "Value", "%s: the file is closed", stream_names[i]);
    fflush(f->f);   /* what Lua wrote before must come before what the child writes */
    io.kind = IO_FD;
    io.fd = fileno(f->f);
  }
  lua_pop(L, 1);
  return io;
}

static void close_pair(int fds[2]) {
  luamp_close_fd(fds[0]);
  luamp_close_fd(fds[1]);
  fds[0] = fds[1] = -1;
}

/* Moves an fd that landed on 0-2 (this process has some of them closed) out of the way:
 * the child's slots 0-2 are filled by dup2 in order, which must not clobber a source. */
static int lift_fd(int fd) {
  if (fd < 0 || fd > 2) return fd;
  int high = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  luamp_close_fd(fd);
  return high;
}

/* Makes the pipes the spec asks for: fds[i][0] the parent's end, fds[i][1] the child's.
 * Returns 0, or -1 with errno and nothing left open. */
static int make_pipes(const io_spec io[3], int fds[3][2]) {
  for (int i = 0; i < 3; i++) fds[i][0] = fds[i][1] = -1;
  for (int i = 0; i < 3; i++) {
    if (io[i].kind != IO_PIPE) continue;
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) goto fail;
    fds[i][0] = lift_fd(i == SP_IN ? p[1] : p[0]);
    fds[i][1] = lift_fd(i == SP_IN ? p[0] : p[1]);
    if (fds[i][0] < 0 || fds[i][1] < 0) goto fail;
  }
  return 0;
fail:;
  int err = errno;
  for (int j = 0; j < 3; j++) close_pair(fds[j]);
  errno = err;
  return -1;
}

/* What fills the child's fds 0-2: src[i] is dup2'd onto i (nothing to do when src[i] == i),
 * or devnull[i] opens /dev/null there. A user's fd on 0-2 bound for another slot is first
 * copied above 2 (into temp[i], closed after the spawn). Returns 0 or -1 with errno. */
typedef struct {
  int src[3], devnull[3], temp[3];
} child_fds;

static int plan_child_fds(const io_spec io[3], int fds[3][2], child_fds *c) {
  for (int i = 0; i < 3; i++) {
    c->devnull[i] = 0;
    switch (io[i].kind) {
    case IO_PIPE: c->src[i] = fds[i][1]; break;
    case IO_DEVNULL: c->devnull[i] = 1; c->src[i] = -1; break;
    case IO_FD:
      c->src[i] = io[i].fd;
      if (io[i].fd < 3 && io[i].fd != i) {
        c->temp[i] = fcntl(io[i].fd, F_DUPFD_CLOEXEC, 3);
        if (c->temp[i] < 0) return -1;
        c->src[i] = c->temp[i];
      }
      break;
    case IO_STDOUT: c->src[i] = c->src[SP_OUT]; c->devnull[i] = c->devnull[SP_OUT]; break;
    default: c->src[i] = i; break;
    }
  }
  return 0;
}

static const char *env_lookup(char **env, const char *name) {
  size_t n = strlen(name);
  for (; *env; env++)
    if (strncmp(*env, name, n) == 0 && (*env)[n] == '=') return *env + n + 1;
  return NULL;
}

/* Finds a program the way execvp would, but in the PATH of the child's environment (as
 * Python does when env is given). Returns 0 with the path in out, or an errno. */
static int find_program(const char *file, const char *path, char *out, size_t cap) {
  if (!path) path = "/bin:/usr/bin";
  int err = ENOENT;
  for (const char *p = path;;) {
    const char *end = strchrnul(p, ':');
    int dirlen = (int)(end - p);
    int n = dirlen ? snprintf(out, cap, "%.*s/%s", dirlen, p, file) : snprintf(out, cap, "%s", file);
    if (n > 0 && (size_t)n < cap) {
      struct stat sb;
      if (access(out, X_OK) == 0 && stat(out, &sb) == 0 && S_ISREG(sb.st_mode)) return 0;
      if (errno == EACCES) err = EACCES;
    }
    if (!*end) return err;
    p = end + 1;
  }
}

typedef struct {
  const char *file, *cwd;
  char **argv, **env;
  int group;
} spawn_req;

/* posix_spawn (a vfork-style clone in glibc: much cheaper than fork for a big parent).
 * The child gets its stdio, cwd, own session when asked, an empty signal mask, and
 * SIGPIPE/SIGXFSZ back to default in case this process ignores them, as well as what a
 * pool worker ignores for itself (SIGINT...: luamp_spawn_sigdefault). Returns 0 or an
 * errno (a failed exec included: glibc reports it and reaps that child itself). */
static int spawn_child(const spawn_req *r, const child_fds *c, pid_t *pid) {
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  int rc = posix_spawn_file_actions_init(&fa);
  if (rc) return rc;
  rc = posix_spawnattr_init(&at);
  if (rc) {
    posix_spawn_file_actions_destroy(&fa);
    return rc;
  }
  for (int i = 0; i < 3 && rc == 0; i++) {
    if (c->devnull[i]) rc = posix_spawn_file_actions_addopen(&fa, i, "/dev/null", i == 0 ? O_RDONLY : O_WRONLY, 0);
    else if (c->src[i] != i) rc = posix_spawn_file_actions_adddup2(&fa, c->src[i], i);
  }
  if (rc == 0 && r->cwd) rc = posix_spawn_file_actions_addchdir_np(&fa, r->cwd);
  sigset_t none, dfl;
  sigemptyset(&none);
  sigemptyset(&dfl);
  sigaddset(&dfl, SIGPIPE);
  sigaddset(&dfl, SIGXFSZ);
  luamp_spawn_sigdefault(&dfl);
  short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | (r->group ? POSIX_SPAWN_SETSID : 0);
  if (rc == 0) rc = posix_spawnattr_setflags(&at, flags);
  if (rc == 0) rc = posix_spawnattr_setsigmask(&at, &none);
  if (rc == 0) rc = posix_spawnattr_setsigdefault(&at, &dfl);
  if (rc == 0) {
    if (r->env && !strchr(r->file, '/')) {
      char path[PATH_MAX];
      rc = find_program(r->file, env_lookup(r->env, "PATH"), path, sizeof path);
      if (rc == 0) rc = posix_spawn(pid, path, &fa, &at, r->argv, r->env);
    } else {
      rc = posix_spawnp(pid, r->file, &fa, &at, r->argv, r->env ? r->env : environ);
    }
  }
  posix_spawnattr_destroy(&at);
  posix_spawn_file_actions_destroy(&fa);
  return rc;
}

/* Starts watching for the child's end: its pidfd in the loop, or a 10 ms tick without. */
static void watch_start(sp_state *st) {
  st->pidfd = (int)syscall(SYS_pidfd_open, st->pid, 0);   /* pidfds are close-on-exec */
  if (st->pidfd >= 0 && uv_poll_init(st->loop, &st->watch.poll, st->pidfd) == 0) {
    st->watch.poll.data = st;
    st->handles++;
    st->watch_open = 1;
    uv_poll_start(&st->watch.poll, UV_READABLE, on_pidfd);
    return;
  }
  luamp_close_fd(st->pidfd);
  st->pidfd = -1;
  uv_timer_init(st->loop, &st->watch.tick);
  st->watch.tick.data = st;
  st->handles++;
  st->watch_open = 1;
  uv_timer_start(&st->watch.tick, on_tick, 10, 10);
}

/* Wraps the parent's pipe ends in uv pipes; an end that cannot be wrapped is closed. */
static void open_streams(sp_state *st, int fds[3][2]) {
  for (int i = 0; i < 3; i++) {
    if (fds[i][0] < 0) continue;
    stream *s = &st->io[i];
    s->st = st;
    if (uv_pipe_init(st->loop, &s->pipe, 0) < 0) {
      luamp_close_fd(fds[i][0]);
      s->eof = 1;
      continue;
    }
    s->pipe.data = s;
    st->handles++;
    s->open = 1;
    if (uv_pipe_open(&s->pipe, fds[i][0]) < 0) {
      luamp_close_fd(fds[i][0]);
      s->eof = 1;
      stream_close(s);
    }
  }
}

static void raise_spawn_error(lua_State *L, int err, const char *file, const char *cwd) {
  if (err == ENOENT || err == ENOTDIR) {
    struct stat sb;
    if (cwd && (stat(cwd, &sb) < 0 || !S_ISDIR(sb.st_mode)))
      luamp_raise(L, "NotFound", "no such directory (cwd): '%s'", cwd);
    luamp_raise(L, "NotFound", "no such program: '%s'", file);
  }
  luamp_raise(L, "Value", "cannot run '%s': %s", file, strerror(err));
}

/* _core.subprocess_spawn{file =, argv = {...}, env = {"K=V", ...} | nil, cwd =,
 *                        stdio = {in, out, err}, group = bool} -> Subprocess handle */
static int l_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  sp_ud *u = lua_newuserdatauv(L, sizeof *u, 0);   /* 2: owns the state once spawned */
  u->st = NULL;
  luaL_setmetatable(L, SUBPROCESS_MT);
  uv_loop_t *loop = luamp_private_loop();
  if (!loop) luamp_raise(L, "Value", "cannot make luamp's event loop");
  spawn_req r;
  lua_getfield(L, 1, "file");
  r.file = spec_string(L, -1, "program");
  r.argv = spec_strings(L, "argv");
  if (!r.argv || !r.argv[0]) luamp_raise(L, "Value", "args must not be empty");
  r.env = spec_strings(L, "env");
  r.cwd = NULL;
  if (lua_getfield(L, 1, "cwd") != LUA_TNIL) r.cwd = spec_string(L, -1, "cwd");
  lua_getfield(L, 1, "group");
  r.group = lua_toboolean(L, -1);
  if (lua_getfield(L, 1, "stdio") != LUA_TTABLE) luamp_raise(L, "Value", "stdio must be a table");
  io_spec io[3];
  for (int i = 0; i < 3; i++) io[i] = spec_io(L, i);
  /* what was printed before must come out before what the child prints */
  if (io[SP_OUT].kind == IO_INHERIT) fflush(stdout);
  if (io[SP_ERR].kind == IO_INHERIT || io[SP_ERR].kind == IO_STDOUT) fflush(stderr);

  sp_state *st = calloc(1, sizeof *st);
  if (!st) luamp_raise(L, "Value", "out of memory");
  st->pidfd = -1;
  int fds[3][2];
  child_fds c = {.temp = {-1, -1, -1}};
  pid_t pid = -1;
  int err = 0;
  if (make_pipes(io, fds) < 0) err = errno;
  else if (plan_child_fds(io, fds, &c) < 0) err = errno;
  else err = spawn_child(&r, &c, &pid);
  for (int i = 0; i < 3; i++) {
    luamp_close_fd(fds[i][1]);   /* the child has its own copies */
    luamp_close_fd(c.temp[i]);
    if (err) luamp_close_fd(fds[i][0]);
  }
  if (err) {
    free(st);
    raise_spawn_error(L, err, r.file, r.cwd);
  }
  st->loop = loop;
  st->owner = luamp_self_pid();
  st->group = r.group;
  st->pid = pid;
  u->st = st;
  watch_start(st);
  open_streams(st, fds);
  uv_timer_init(st->loop, &st->timer);
  st->timer.data = st;
  st->handles++;
  st->timer_open = 1;
  lua_settop(L, 2);
  return 1;
}

/* ---- Lua binding ---------------------------------------------------------------------- */

static int stream_arg(lua_State *L, int idx) {
  lua_Integer i = luaL_checkinteger(L, idx);
  if (i < SP_IN || i > SP_ERR) luamp_raise(L, "Value", "bad stream index %lld", (long long)i);
  return (int)i;
}

static int l_pid(lua_State *L) {
  lua_pushinteger(L, check_state(L)->pid);
  return 1;
}

/* :returncode() -> what is known without running the loop, or nil */
static int l_returncode(lua_State *L) {
  sp_state *st = check_state(L);
  if (!st->exited) return 0;
  lua_pushinteger(L, st->returncode);
  return 1;
}

/* :poll() -> returncode or nil while running */
static int l_poll(lua_State *L) {
  sp_state *st = check_own(L);
  try_reap(st);
  if (!st->exited) return 0;
  lua_pushinteger(L, st->returncode);
  return 1;
}

static double timeout_arg(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return -1;
  double t = luaL_checknumber(L, idx);
  if (isnan(t)) luamp_raise(L, "Value", "timeout must not be NaN");
  if (isinf(t)) return t > 0 ? -1 : 0;
  return t < 0 ? 0 : t;
}

/* :wait([timeout]) -> returncode, or nil when the timeout passed */
static int l_wait(lua_State *L) {
  sp_state *st = check_own(L);
  double timeout = timeout_arg(L, 2);
  if (!st->exited) {
    int rc = loop_wait(st, done_exited, NULL, timeout);
    if (rc == WAIT_TIMEOUT) return 0;
    if (rc != WAIT_DONE) raise_wait(L, rc, "the child");
  }
  lua_pushinteger(L, st->returncode);
  return 1;
}

/* :signal(signum, [group]): to the child, or to its whole process group when it has one
 * and `group` is set. Nothing once the child has been reaped (its pid may be reused) —
 * except to a group, which lives on in what the child started. */
static int l_signal(lua_State *L) {
  sp_state *st = check_own(L);
  int sig = (int)luaL_checkinteger(L, 2);
  int group = lua_toboolean(L, 3) && st->group;
  if (sig < 0 || sig >= 65) luamp_raise(L, "Value", "bad signal number %d", sig);
  int r = 0;
  if (group) r = kill(-st->pid, sig);
  else if (!st->exited) r = kill(st->pid, sig);
  if (r < 0 && errno != ESRCH && !(group && errno == EPERM)) luamp_raise_errno(L, "Value", "kill", errno);
  return 0;
}

/* Pushes and consumes a stream's buffered bytes (nil if it never was a pipe). */
static void push_taken(lua_State *L, sp_state *st, int i, int was_pipe) {
  stream *s = &st->io[i];
  if (!was_pipe) { lua_pushnil(L); return; }
  lua_pushlstring(L, rbuf_data(s), rbuf_len(s));
  s->taken = s->buf.len = 0;
}

static int is_pipe(sp_state *st, int i) { return st->io[i].st != NULL; }

/* :communicate([input], [timeout]) -> true, stdout, stderr | false on timeout.
 * Sends input then closes stdin, reads both outputs to their end and waits for the exit.
 * After a timeout nothing is lost: a later call resumes where this one stopped. */
static int l_communicate(lua_State *L) {
  sp_state *st = check_own(L);
  size_t len = 0;
  const char *input = lua_isnoneornil(L, 2) ? NULL : luaL_checklstring(L, 2, &len);
  double timeout = timeout_arg(L, 3);
  stream *in = &st->io[SP_IN];
  if (input && st->comm_started)
    luamp_raise(L, "Value", "communicate: cannot send input after communication started");
  if (input && !in->open) luamp_raise(L, "Value", "communicate: input given but stdin is not an open pipe");
  if (!st->comm_started) {
    st->comm_started = 1;
    if (in->open) {
      if (input) stream_write(in, input, len);
      in->close_when_drained = 1;
      if (in->queued == 0 || in->write_err) stream_close(in);
    }
  }
  reads_start(st);
  int rc = loop_wait(st, done_communicated, NULL, timeout);
  reads_stop(st);
  if (rc == WAIT_TIMEOUT) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (rc != WAIT_DONE) raise_wait(L, rc, "the child's output");
  for (int i = SP_OUT; i <= SP_ERR; i++)
    if (st->io[i].read_err) luamp_raise(L, "Value", "reading %s: %s", stream_names[i], uv_strerror(st->io[i].read_err));
  lua_pushboolean(L, 1);
  push_taken(L, st, SP_OUT, is_pipe(st, SP_OUT));
  push_taken(L, st, SP_ERR, is_pipe(st, SP_ERR));
  stream_close(&st->io[SP_OUT]);
  stream_close(&st->io[SP_ERR]);
  return 3;
}

/* :take(i) -> the bytes buffered so far on output stream i (nil if not a pipe) */
static int l_take(lua_State *L) {
  sp_state *st = check_state(L);
  int i = stream_arg(L, 2);
  push_taken(L, st, i, is_pipe(st, i));
  return 1;
}

static stream *check_stream(lua_State *L, sp_state *st, int i, int writing) {
  stream *s = &st->io[i];
  if (!is_pipe(st, i)) luamp_raise(L, "Value", "%s is not a pipe", stream_names[i]);
  if (writing != (i == SP_IN))
    luamp_raise(L, "Value", "%s is not %s", stream_names[i], writing ? "writable" : "readable");
  if (!s->open) luamp_raise(L, "Value", "%s is closed", stream_names[i]);
  return s;
}

static void raise_write_error(lua_State *L, int err) {
  if (err == UV_EPIPE) luamp_raise(L, "BrokenPipe", "stdin: the child closed its end of the pipe");
  luamp_raise(L, "Value", "writing to stdin: %s", uv_strerror(err));
}

/* Waits until no more than `limit` bytes are queued for stdin; outputs keep draining. */
static void drain_stdin(lua_State *L, sp_state *st, size_t limit) {
  stream *s = &st->io[SP_IN];
  if (s->queued > limit && !s->write_err) {
    reads_start(st);
    int rc = loop_wait(st, done_flushed, &limit, -1);
    reads_stop(st);
    if (rc != WAIT_DONE) raise_wait(L, rc, "stdin to drain");
  }
  if (s->write_err) raise_write_error(L, s->write_err);
}

/* :write(i, s): queued writes beyond the high-water mark block until the child catches up */
static int l_write(lua_State *L) {
  sp_state *st = check_own(L);
  stream *s = check_stream(L, st, stream_arg(L, 2), 1);
  size_t len;
  const char *data = luaL_checklstring(L, 3, &len);
  int err = stream_write(s, data, len);
  if (err) raise_write_error(L, err);
  drain_stdin(L, st, WRITE_HIGH_WATER);
  return 0;
}

/* :flush(i): until everything written has reached the pipe */
static int l_flush(lua_State *L) {
  sp_state *st = check_own(L);
  check_stream(L, st, stream_arg(L, 2), 1);
  drain_stdin(L, st, 0);
  return 0;
}

static void push_consumed(lua_State *L, stream *s, size_t n, size_t skip) {
  lua_pushlstring(L, rbuf_data(s), n);
  s->taken += n + skip;
}

/* :read(i, fmt) with fmt "a", "l", "L" or a byte count -> string, or nil at end of data */
static int l_read(lua_State *L) {
  sp_state *st = check_own(L);
  int i = stream_arg(L, 2);
  stream *s = check_stream(L, st, i, 0);
  read_ctx r = {.s = s, .want = 0, .scanned = 0, .line = 0};
  char fmt = 0;
  int probe = 0;   /* read(0): "" unless at the end of data */
  if (lua_type(L, 3) == LUA_TNUMBER) {
    lua_Integer n = luaL_checkinteger(L, 3);
    if (n < 0) luamp_raise(L, "Value", "read: negative count");
    probe = n == 0;
    r.want = probe ? 1 : (size_t)n;
  } else {
    const char *f = luaL_checkstring(L, 3);
    if (*f == '*') f++;
    fmt = *f;
    if (fmt == 'a') r.want = SIZE_MAX;
    else if (fmt == 'l' || fmt == 'L') r.line = 1;
    else luamp_raise(L, "Value", "read: unsupported format '%s'", lua_tostring(L, 3));
  }
  if (!done_readable(st, &r)) {
    reads_start(st);
    int rc = loop_wait(st, done_readable, &r, -1);
    reads_stop(st);
    if (rc != WAIT_DONE) raise_wait(L, rc, stream_names[i]);
  }
  if (s->read_err) luamp_raise(L, "Value", "reading %s: %s", stream_names[i], uv_strerror(s->read_err));
  size_t have = rbuf_len(s);
  if (fmt == 'a') {
    push_consumed(L, s, have, 0);
  } else if (r.line) {
    if (have == 0) return 0;
    const char *p = rbuf_data(s);
    const char *nl = memchr(p, '\n', have);
    size_t n = nl ? (size_t)(nl - p) : have;
    if (fmt == 'L' && nl) push_consumed(L, s, n + 1, 0);
    else push_consumed(L, s, n, nl ? 1 : 0);
  } else if (probe) {
    if (have == 0) return 0;
    lua_pushliteral(L, "");
  } else {
    if (have == 0) return 0;
    push_consumed(L, s, have < r.want ? have : r.want, 0);
  }
  return 1;
}

/* :close_stream(i): stdin is flushed first (a broken pipe then is not an error) */
static int l_close_stream(lua_State *L) {
  sp_state *st = check_state(L);
  int i = stream_arg(L, 2);
  stream *s = &st->io[i];
  if (!s->open) return 0;
  if (i == SP_IN && st->owner == luamp_self_pid() && s->queued > 0 && !s->write_err) {
    size_t limit = 0;
    reads_start(st);
    int rc = loop_wait(st, done_flushed, &limit, -1);
    reads_stop(st);
    if (rc != WAIT_DONE) raise_wait(L, rc, "stdin to drain");
  }
  stream_close(s);
  return 0;
}

/* :stream_state(i) -> "open" | "closed" | nil when not a pipe */
static int l_stream_state(lua_State *L) {
  sp_state *st = check_state(L);
  int i = stream_arg(L, 2);
  if (!is_pipe(st, i)) return 0;
  lua_pushstring(L, st->io[i].open ? "open" : "closed");
  return 1;
}

static int l_owned(lua_State *L) {
  lua_pushboolean(L, check_state(L)->owner == luamp_self_pid());
  return 1;
}

static int l_in_group(lua_State *L) {
  lua_pushboolean(L, check_state(L)->group);
  return 1;
}

/* The one release behind __gc, __close and :close(). A running child of this process
 * stays registered with libuv (so it is reaped once it exits) but nothing else remains;
 * a handle inherited through fork is only closed here, never waited for or killed. */
static void subprocess_release(sp_ud *u) {
  sp_state *st = u->st;
  if (!st) return;
  u->st = NULL;
  for (int i = 0; i < 3; i++) stream_close(&st->io[i]);
  timer_close(st);
  if (st->owner == luamp_self_pid() && !st->exited && st->watch_open) {
    /* keep watching so the child is reaped when it ends, without holding the loop open */
    uv_unref((uv_handle_t *)&st->watch);
  } else {
    watch_close(st);
  }
  if (!luamp_private_loop_running()) loop_step();   /* lets the close callbacks free the memory */
}

static int l_close(lua_State *L) {
  subprocess_release(check_ud(L));
  return 0;
}

static int l_tostring(lua_State *L) {
  sp_ud *u = check_ud(L);
  if (!u->st) lua_pushliteral(L, "<luamp.Subprocess closed>");
  else lua_pushfstring(L, "<luamp.Subprocess pid=%d>", (int)u->st->pid);
  return 1;
}

/* _core.environ() -> {NAME = value, ...} of this process */
static int l_environ(lua_State *L) {
  lua_newtable(L);
  for (char **e = environ; e && *e; e++) {
    const char *eq = strchr(*e, '=');
    if (!eq || eq == *e) continue;
    lua_pushlstring(L, *e, (size_t)(eq - *e));
    lua_pushstring(L, eq + 1);
    lua_rawset(L, -3);
  }
  return 1;
}

int luamp_open_subprocess(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"pid", l_pid},
    {"returncode", l_returncode},
    {"poll", l_poll},
    {"wait", l_wait},
    {"signal", l_signal},
    {"communicate", l_communicate},
    {"take", l_take},
    {"write", l_write},
    {"flush", l_flush},
    {"read", l_read},
    {"close_stream", l_close_stream},
    {"stream_state", l_stream_state},
    {"owned", l_owned},
    {"in_group", l_in_group},
    {"close", l_close},
    {NULL, NULL}
  };
  static const luaL_Reg meta[] = {
    {"__gc", l_close},
    {"__close", l_close},
    {"__tostring", l_tostring},
    {"__index", NULL},
    {NULL, NULL}
  };
  if (luaL_newmetatable(L, SUBPROCESS_MT)) {
    luaL_setfuncs(L, meta, 0);
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_spawn);
  lua_setfield(L, -2, "subprocess_spawn");
  lua_pushcfunction(L, l_environ);
  lua_setfield(L, -2, "environ");
  static const struct { const char *name; int num; } sigs[] = {
    {"SIGHUP", SIGHUP}, {"SIGINT", SIGINT}, {"SIGQUIT", SIGQUIT}, {"SIGKILL", SIGKILL},
    {"SIGUSR1", SIGUSR1}, {"SIGUSR2", SIGUSR2}, {"SIGPIPE", SIGPIPE}, {"SIGALRM", SIGALRM},
    {"SIGTERM", SIGTERM}, {"SIGCONT", SIGCONT}, {"SIGSTOP", SIGSTOP}, {NULL, 0}
  };
  lua_newtable(L);
  for (int i = 0; sigs[i].name; i++) {
    lua_pushinteger(L, sigs[i].num);
    lua_setfield(L, -2, sigs[i].name);
  }
  lua_setfield(L, -2, "signals");
  return 0;
}
