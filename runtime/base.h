/*
 * base.h — the runtime's base layer (base.c, loop.c): process-wide state and the hooks
 * through which the files above it take part in fork, exec and the end of the program.
 *
 * The base calls no other luamp file; every other file may call it. Files above it do not
 * call each other to say "a fork happened" or "the program ends": each registers what it
 * must do (luamp_atfork, luamp_atspawn, luamp_atexit) in its luamp_open_<concept> (or when
 * it first makes the state the hook looks after), and whoever forks, spawns or exits runs
 * the registry, knowing none of the objects behind it. See docs/design.md, "Layers".
 *
 * Hooks are registered from luaopen (or the first use of a concept), never while a fork
 * or an exit runs them; registering the same hook again is a no-op, so a process that
 * opens luamp in several Lua states registers each once. The registries are fixed-size
 * arrays: running them allocates nothing, which a half-made child requires.
 */
#ifndef LUAMP_BASE_H
#define LUAMP_BASE_H

#include <signal.h>
#include <stddef.h>
#include <sys/types.h>

#include <lua.h>

/* ---- descriptors ----------------------------------------------------------------------- */

/* close() that keeps errno and never retries on EINTR (Linux frees the fd anyway). */
void luamp_close_fd(int fd);

/* ---- memory ---------------------------------------------------------------------------- */

/* Maps the whole pages inside [p, p + n) into this process now, one system call instead
 * of a page fault per 4 KiB page (a fault costs ~14 us on the virtual machines luamp is
 * measured on, populating ~1.5 us): for memory about to be written (write) or read in
 * full (the Pool's rings, big codec buffers, big Lua blocks). A hint: 0 done, -1 not (the
 * pages then come by faults as before). */
int luamp_populate(void *p, size_t n, int write);
/* A cache of freed 1-4 KiB blocks over L's allocator (alloc.c); the luamp program puts it
 * on each state it makes. */
void luamp_alloc_cache_on(lua_State *L);
#define LUAMP_POPULATE_MIN (64u << 10)    /* smaller blocks are left to faults */

/* One pause of a spin-wait loop: tells the CPU (and a hypervisor) that this thread is
 * spinning, so the sibling hyperthread or the lock holder gets the pipeline. */
static inline void luamp_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* ---- adaptive spinning ---------------------------------------------------------------------
 * A waiter that expects data within microseconds (the Pool's rings, a Pipe) spins a little
 * before it sleeps. Its budget adapts to how long data takes to come after a spin begins:
 * a spin that catches data raises the budget to twice what it needed, if that is more. A
 * spin in vain is judged when the data comes (luamp_spin_late), from the sender's stamp of
 * when it published (its CLOCK_MONOTONIC, luamp_mono_ns, which all processes share), not
 * from when the sleep ended: data within LUAMP_SPIN_MAX_NS of the spin's start raises the
 * budget to twice that delay, later data halves it (down to LUAMP_SPIN_MIN_NS). Spins in
 * vain with a budget above LUAMP_SPIN_MIN_NS, three in a row with none caught between,
 * make the next waits spin only LUAMP_SPIN_MIN_NS: one wait, then two, four... up to 64
 * (all reset by a spin that catches its data). So on a loaded machine a waiter hardly
 * spins, and on an idle one the odd spin in vain changes nothing. */
#define LUAMP_SPIN_MIN_NS 2000.0
#define LUAMP_SPIN_MAX_NS 50000.0

typedef struct luamp_spin {
  double ns;              /* the budget */
  unsigned backoff;       /* waits to spin the least after the next long spin in vain */
  unsigned skip;          /* waits left that spin the least */
  unsigned vain;          /* long spins in vain since the last one that caught data */
  double gave_up;         /* when the last spin in vain began (ns), 0: none since */
} luamp_spin;

double luamp_mono_ns(void);
void luamp_spin_init(luamp_spin *s);
/* The spin a waiter may afford now: its budget, or the least after long spins in vain. */
static inline double luamp_spin_budget(const luamp_spin *s) {
  return s->skip > 0 ? LUAMP_SPIN_MIN_NS : s->ns;
}
/* After a spin of up to `budget` ns that began at `began`: data caught `waited` ns in, */
void luamp_spin_caught(luamp_spin *s, double waited, double budget);
/* or none (the next luamp_spin_late judges it). */
void luamp_spin_in_vain(luamp_spin *s, double began, double budget);
/* Data found after a spin in vain (s->gave_up > 0), published at the sender's stamp
 * `rang_at` (a hint: used only if it falls between the spin's start and now). */
void luamp_spin_late(luamp_spin *s, double rang_at);

/* ---- this process ------------------------------------------------------------------------ */

/* What describes this process alone: its pid (cached: getpid() is a real system call and
 * the lock fast paths (sync.c) store it on every acquire) and the pending-interrupt mark.
 * It fills a page of its own that every child, forked by luamp or by anyone, finds zero
 * (base.c: MADV_WIPEONFORK), so nothing has to reset it after a fork and a fork never
 * copies it. */
typedef union luamp_self_page {
  struct {
    pid_t pid;                            /* 0 until first asked */
    volatile sig_atomic_t interrupt_mark;
    unsigned processes_made;              /* Process objects made here (their identities) */
  } s;
  char page[4096];
} luamp_self_page;
extern luamp_self_page luamp_self;
pid_t luamp_self_pid_slow(void);
static inline pid_t luamp_self_pid(void) {
  pid_t p = luamp_self.s.pid;
  return p ? p : luamp_self_pid_slow();
}

/* The pending-interrupt mark. luamp_request_interrupt (luamp.h) sets it for the next (or
 * current) wait to report; the library installs no signal handler of its own (see
 * interrupt.c). A forked child starts without it. */
static inline int luamp_interrupt_pending(void) { return luamp_self.s.interrupt_mark != 0; }
/* Returns and clears the pending-interrupt mark. */
int luamp_take_interrupt(void);

/* The executable set by luamp_set_executable (luamp.h), or NULL. */
const char *luamp_executable(void);
/* The executable for spawn children: luamp_executable(), else the luamp program beside
 * the loaded luamp.so, else the installed one; NULL if none is executable. */
const char *luamp_spawn_executable(void);

/* ---- fork hooks, in the manner of pthread_atfork -----------------------------------------
 * Whoever forks (luamp_fork, with signals blocked) calls luamp_fork_prepare() just
 * before fork(), then luamp_fork_child() in the child or luamp_fork_parent(pid) in the
 * parent (pid < 0: the fork failed and prepare's work is to be undone). As with
 * pthread_atfork, prepare hooks run in reverse registration order and parent/child hooks
 * in registration order, so a pair of hooks nests around the fork like a lock: what
 * registered first prepares last and recovers first. Any of the three may be NULL.
 * Child hooks run with signals blocked in a half-made child: no Lua, no malloc'd state
 * of the parent's to free, only resetting what the child must not share. A fork done
 * without luamp_fork (a library's raw fork()) runs none of them; the owners cope
 * (the pid cache is wiped by the kernel in every child; handles check their owner pid). */
void luamp_atfork(void (*prepare)(void), void (*parent)(pid_t pid), void (*child)(void));

/* fflush(NULL) for a fork or a forked child's exit, which writes no page when no stream
 * holds unwritten output (see base.c): what a fork would print twice, or an exit lose, is
 * written first, as fflush(NULL) does. */
void luamp_flush_stdio(void);
void luamp_fork_prepare(void);
void luamp_fork_parent(pid_t pid);
void luamp_fork_child(void);

/* For the code a forked child runs before its target and on its way out (luamp_fork, the
 * child and child-exit hooks): gathered on a page or two of its own. The first touch of a
 * page of the parent's memory, code included, costs a child ~4 us on the VMs luamp is
 * measured on (the hypervisor maps it in), and these functions lay on seven pages, one or
 * two per file. The linkers place every .text.hot.* section together. */
#define LUAMP_CHILD_PATH __attribute__((section(".text.hot.luamp_child")))

/* ---- exec hooks ---------------------------------------------------------------------------
 * Whoever starts a program with posix_spawn (a spawn child, a subprocess) asks for the
 * signals the new program must get back at their default disposition
 * (POSIX_SPAWN_SETSIGDEF): every registered hook adds the signals its owner changed from
 * what this process inherited (a pool worker's SIGINT...). */
void luamp_atspawn(void (*sigdefault)(sigset_t *set));
void luamp_spawn_sigdefault(sigset_t *set);

/* ---- the end ------------------------------------------------------------------------------
 * luamp_atexit(fn, when): fn runs when the program ends (LUAMP_AT_END: the close of a Lua
 * state that opened luamp, which is the end of the main script in both the luamp host and
 * stock lua5.4, or exit() without a close), and/or when a forked child leaves
 * (LUAMP_AT_CHILD_EXIT: it runs them, then _exit). Hooks run in reverse registration
 * order, as atexit's do; each must be safe to run more than once. */
#define LUAMP_AT_END 1
#define LUAMP_AT_CHILD_EXIT 2
void luamp_atexit(void (*fn)(void), int when);
void luamp_exit_hooks_run(int when);
/* Arranges for the LUAMP_AT_END hooks to run when L closes and at exit(); luaopen_luamp
 * calls it first, so they run after the state's other finalizers. */
void luamp_exit_hooks_install(lua_State *L);
/* Runs fn (as a __gc) when L is closed, through a userdata kept in the registry under key.
 * Installs it once per state: returns 1 if it was installed now, 0 if already there. */
int luamp_on_close(lua_State *L, const char *key, lua_CFunction fn);

/* ---- libuv loops (loop.c) ----------------------------------------------------------------
 * luamp runs only its private loop, never re-entrantly, never the host's nor libuv's
 * default loop. The private loop, made on first use (NULL if libuv cannot make it; once
 * made, a forked child re-makes its copy through a fork hook): */
struct uv_loop_s *luamp_private_loop(void);
/* One non-blocking iteration of it; -1 (nothing run) from inside its own run or before
 * it exists. */
int luamp_private_loop_step(void);
int luamp_private_loop_running(void);        /* 1 while luamp_private_loop_step runs it */
/* Its callbacks call luamp_private_loop_note; the count of them, and the loop's backend
 * fd (-1 before it is made), let the task scheduler wake the tasks waiting on it when a
 * step in another task ran their callbacks. */
void luamp_private_loop_note(void);
unsigned luamp_private_loop_events(void);
int luamp_private_loop_fd(void);
/* With a host loop set (luamp_set_loop), watches fd on it so the host's own uv_run calls
 * ready(fd) when fd becomes readable (wait.c passes its pump runner); unwatch when the
 * fd's pump goes. No-ops otherwise. */
void luamp_host_watch(int fd, int (*ready)(int fd));
void luamp_host_unwatch(int fd);
/* The host's loop (luamp_set_loop) in the process that set it, else NULL: the task
 * scheduler (sched.c) puts its own watches there. */
struct uv_loop_s *luamp_host_loop(void);

#endif
