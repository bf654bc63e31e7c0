/*
 * base.c — the base layer: process-wide state every runtime file may use, and the
 * registries of fork, exec and end-of-program hooks (declared in base.h, which says the
 * rules). It calls no other luamp file. It also owns the executable a host names
 * (luamp_set_executable) and finds the one spawn children run.
 *
 * Why registries. Several files keep state a fork must fix up (the arena's reference
 * counts, the private libuv loop, the list of children), and a spawn or forkserver start
 * adds more. If the file that forks called each of them, it would depend on all of them
 * and they on it (they need its pid and fork), a circle that every new concept widens.
 * pthread_atfork solved the same problem for libc: the owner of the state registers what
 * to do, and fork() runs the list. luamp_fork does not use pthread_atfork itself because
 * its hooks must run only for luamp's own forks, with signals blocked, and must know
 * whether the fork failed; the pid cache, which must be right after any fork, needs no
 * hook at all: the kernel wipes it in every child (luamp_self, below).
 *
 * Ordering follows pthread_atfork: prepare in reverse registration order, parent and
 * child in registration order; exit hooks in reverse order, as atexit. Registration is
 * rare (once per concept per process), so a mutex guards it; running reads the arrays
 * without one (they only grow, and a fork or an exit is not concurrent with luaopen).
 */
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>

#include "base.h"
#include "luamp.h"

#define MAX_HOOKS 16

static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER;

static _Noreturn void too_many(const char *what) {
  /* a fixed number of concepts registers hooks: more is a bug, found in the first run */
  fprintf(stderr, "luamp: too many %s hooks (raise MAX_HOOKS in base.c)\n", what);
  abort();
}

/* ---- descriptors ------------------------------------------------------------------------ */

void luamp_close_fd(int fd) {
  int saved = errno;
  if (fd >= 0) close(fd);
  /* errno lives in the thread's TLS page: writing it unchanged would copy that page
   * after a fork, for nothing */
  if (errno != saved) errno = saved;
}

/* ---- memory ------------------------------------------------------------------------------ */

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#define MADV_POPULATE_WRITE 23
#endif

int luamp_populate(void *p, size_t n, int write) {
  static int unsupported;   /* a kernel before 5.14 is not asked again */
  if (unsupported) return -1;
  uintptr_t a = ((uintptr_t)p + 4095) & ~(uintptr_t)4095;
  uintptr_t e = ((uintptr_t)p + n) & ~(uintptr_t)4095;
  if (e <= a) return 0;
  int saved = errno;
  int rc = madvise((void *)a, e - a, write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ);
  if (rc < 0 && errno == EINVAL) unsupported = 1;
  errno = saved;
  return rc < 0 ? -1 : 0;
}

/* ---- adaptive spinning (see base.h) ------------------------------------------------------ */

#define SPIN_BACKOFF_MAX 64       /* waits that spin the least after spins in vain */
#define SPIN_VAIN_IN_A_ROW 3      /* long spins in vain before the back-off starts */

double luamp_mono_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

void luamp_spin_init(luamp_spin *s) {
  memset(s, 0, sizeof *s);
  s->ns = LUAMP_SPIN_MIN_NS;
}

/* The budget after data came `delay` ns after a spin began: at least twice that, so the
 * next spin catches it too (never less on a success: a waiter whose data comes within the
 * budget loses nothing by keeping it). */
static void spin_grow(luamp_spin *s, double delay) {
  double want = 2 * delay + LUAMP_SPIN_MIN_NS;
  if (want > LUAMP_SPIN_MAX_NS) want = LUAMP_SPIN_MAX_NS;
  if (want > s->ns) s->ns = want;
}

static void spin_judged(luamp_spin *s, int caught, double budget) {
  if (s->skip > 0) s->skip--;
  if (caught) {
    s->backoff = s->vain = 0;
  } else if (budget > LUAMP_SPIN_MIN_NS * 1.5 && ++s->vain >= SPIN_VAIN_IN_A_ROW) {
    s->backoff = s->backoff ? s->backoff * 2 : 1;
    if (s->backoff > SPIN_BACKOFF_MAX) s->backoff = SPIN_BACKOFF_MAX;
    s->skip = s->backoff;
  }
}

void luamp_spin_caught(luamp_spin *s, double waited, double budget) {
  spin_grow(s, waited);
  spin_judged(s, 1, budget);
  s->gave_up = 0;
}

void luamp_spin_in_vain(luamp_spin *s, double began, double budget) {
  spin_judged(s, 0, budget);
  s->gave_up = began;
}

void luamp_spin_late(luamp_spin *s, double rang_at) {
  double began = s->gave_up;
  s->gave_up = 0;
  double t = luamp_mono_ns();
  double delay = rang_at >= began && rang_at <= t ? rang_at - began : t - began;
  if (delay <= LUAMP_SPIN_MAX_NS) {
    spin_grow(s, delay);
  } else {
    s->ns /= 2;
    if (s->ns < LUAMP_SPIN_MIN_NS) s->ns = LUAMP_SPIN_MIN_NS;
  }
}

/* ---- this process ------------------------------------------------------------------------ */

/* The page that describes this process alone (base.h). MADV_WIPEONFORK makes the kernel
 * hand every child a zero page in its place: the pid cache is right after any fork, a
 * Ctrl-C meant for the parent is not the child's, and the parent's copy is neither copied
 * nor write-protected by fork() — a page written after a fork while the child runs costs
 * a copy-on-write fault (tens of microseconds, with a TLB shootdown, on the VMs this
 * project runs on), so state a child must not inherit is best kept where fork does not
 * look. The union fills its page, so nothing else shares what is wiped. Where the kernel
 * cannot wipe it (before Linux 4.14, or a host whose loader made .bss a file mapping), a
 * pthread_atfork child handler clears it instead, in any fork that goes through libc. */
luamp_self_page luamp_self __attribute__((aligned(4096)));

static void clear_self(void) { memset(&luamp_self, 0, sizeof luamp_self); }

static void self_setup(void) {
  if (madvise(&luamp_self, sizeof luamp_self, MADV_WIPEONFORK) != 0) pthread_atfork(NULL, NULL, clear_self);
}

pid_t luamp_self_pid_slow(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, self_setup);
  luamp_self.s.pid = getpid();
  return luamp_self.s.pid;
}

void luamp_request_interrupt(void) { luamp_self.s.interrupt_mark = 1; }

int luamp_take_interrupt(void) {
  int was = luamp_self.s.interrupt_mark;
  if (was) luamp_self.s.interrupt_mark = 0;
  return was;
}

static char *executable_path;

void luamp_set_executable(const char *path) {
  char *copy = path ? strdup(path) : NULL;
  free(executable_path);
  executable_path = copy;
}

const char *luamp_executable(void) { return executable_path; }

static int executable_file(const char *path) {
  return path && access(path, X_OK) == 0;
}

/* The one the host gave (luamp_set_executable: the luamp host gives its own
 * /proc/self/exe), else the luamp program beside the luamp.so that holds this code (a
 * build tree), else the installed one (LUAMP_BINDIR). */
const char *luamp_spawn_executable(void) {
  static char beside[PATH_MAX];
  const char *set = luamp_executable();
  if (set) return set;
  Dl_info info;
  if (dladdr((void *)luamp_spawn_executable, &info) && info.dli_fname) {
    const char *slash = strrchr(info.dli_fname, '/');
    size_t dir = slash ? (size_t)(slash - info.dli_fname) + 1 : 0;
    if (dir + sizeof "luamp" <= sizeof beside) {
      memcpy(beside, info.dli_fname, dir);
      memcpy(beside + dir, "luamp", sizeof "luamp");
      if (strcmp(beside, info.dli_fname) != 0 && executable_file(beside)) return beside;
    }
  }
#ifdef LUAMP_BINDIR
  if (executable_file(LUAMP_BINDIR "/luamp")) return LUAMP_BINDIR "/luamp";
#endif
  return NULL;
}

/* ---- fork hooks -------------------------------------------------------------------------- */

/* Whether a stream may hold output not yet written. fflush(NULL) answers by locking
 * libc's list of streams, and the lock word (in libc's .bss) and the thread's cleanup
 * record (in its TLS block) are written even when there is nothing to flush: around
 * every fork that is two pages the parent writes before it, write-protected by the fork
 * before, and one more page a child writes on its way out, each a page fault (~20 us on
 * the VMs luamp is measured on). glibc's stream list is public data (_IO_list_all, each
 * FILE's _chain and write pointers, as its own _IO_flush_all reads them): in a process
 * with one thread nothing changes the list under a reader, and a stream whose write
 * pointer stands at its buffer's start has nothing to flush. A wide-oriented stream, a
 * second thread (now or ever), another libc: the answer is yes, and fflush(NULL) runs. */
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
extern FILE *_IO_list_all;
extern char __libc_single_threaded;

static int stdio_may_hold_output(void) {
  if (!__libc_single_threaded) return 1;
  for (FILE *f = _IO_list_all; f; f = f->_chain)
    if (f->_mode > 0 || f->_IO_write_ptr > f->_IO_write_base) return 1;
  return 0;
}
#else
static int stdio_may_hold_output(void) { return 1; }
#endif

LUAMP_CHILD_PATH void luamp_flush_stdio(void) {
  if (stdio_may_hold_output()) fflush(NULL);
}

static struct {
  void (*prepare)(void);
  void (*parent)(pid_t pid);
  void (*child)(void);
} fork_hooks[MAX_HOOKS];
static int n_fork_hooks;

void luamp_atfork(void (*prepare)(void), void (*parent)(pid_t pid), void (*child)(void)) {
  pthread_mutex_lock(&registry_mu);
  for (int i = 0; i < n_fork_hooks; i++) {
    if (fork_hooks[i].prepare == prepare && fork_hooks[i].parent == parent &&
        fork_hooks[i].child == child) {
      pthread_mutex_unlock(&registry_mu);
      return;
    }
  }
  if (n_fork_hooks == MAX_HOOKS) too_many("fork");
  fork_hooks[n_fork_hooks].prepare = prepare;
  fork_hooks[n_fork_hooks].parent = parent;
  fork_hooks[n_fork_hooks].child = child;
  n_fork_hooks++;
  pthread_mutex_unlock(&registry_mu);
}

void luamp_fork_prepare(void) {
  for (int i = n_fork_hooks - 1; i >= 0; i--)
    if (fork_hooks[i].prepare) fork_hooks[i].prepare();
}

void luamp_fork_parent(pid_t pid) {
  for (int i = 0; i < n_fork_hooks; i++)
    if (fork_hooks[i].parent) fork_hooks[i].parent(pid);
}

LUAMP_CHILD_PATH void luamp_fork_child(void) {
  for (int i = 0; i < n_fork_hooks; i++)
    if (fork_hooks[i].child) fork_hooks[i].child();
}

/* ---- exec hooks -------------------------------------------------------------------------- */

static void (*spawn_hooks[MAX_HOOKS])(sigset_t *set);
static int n_spawn_hooks;

void luamp_atspawn(void (*sigdefault)(sigset_t *set)) {
  pthread_mutex_lock(&registry_mu);
  for (int i = 0; i < n_spawn_hooks; i++) {
    if (spawn_hooks[i] == sigdefault) {
      pthread_mutex_unlock(&registry_mu);
      return;
    }
  }
  if (n_spawn_hooks == MAX_HOOKS) too_many("spawn");
  spawn_hooks[n_spawn_hooks++] = sigdefault;
  pthread_mutex_unlock(&registry_mu);
}

void luamp_spawn_sigdefault(sigset_t *set) {
  for (int i = 0; i < n_spawn_hooks; i++) spawn_hooks[i](set);
}

/* ---- the end ------------------------------------------------------------------------------ */

static struct {
  void (*fn)(void);
  int when;
} exit_hooks[MAX_HOOKS];
static int n_exit_hooks;

void luamp_atexit(void (*fn)(void), int when) {
  pthread_mutex_lock(&registry_mu);
  for (int i = 0; i < n_exit_hooks; i++) {
    if (exit_hooks[i].fn == fn) {
      exit_hooks[i].when |= when;
      pthread_mutex_unlock(&registry_mu);
      return;
    }
  }
  if (n_exit_hooks == MAX_HOOKS) too_many("exit");
  exit_hooks[n_exit_hooks].fn = fn;
  exit_hooks[n_exit_hooks].when = when;
  n_exit_hooks++;
  pthread_mutex_unlock(&registry_mu);
}

LUAMP_CHILD_PATH void luamp_exit_hooks_run(int when) {
  for (int i = n_exit_hooks - 1; i >= 0; i--)
    if (exit_hooks[i].when & when) exit_hooks[i].fn();
}

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

/* A registry-held userdata whose __gc runs at lua_close: the end of the main script in
 * both the luamp host and stock lua5.4. atexit covers os.exit() without a close. */
static int end_gc(lua_State *L) {
  (void)L;
  luamp_exit_hooks_run(LUAMP_AT_END);
  return 0;
}

static void at_process_exit(void) { luamp_exit_hooks_run(LUAMP_AT_END); }

void luamp_exit_hooks_install(lua_State *L) {
  static int atexit_done;
  if (!luamp_on_close(L, "luamp.finish", end_gc)) return;
  pthread_mutex_lock(&registry_mu);
  if (!atexit_done) {
    atexit(at_process_exit);
    atexit_done = 1;
  }
  pthread_mutex_unlock(&registry_mu);
}
