/*
 * process.c — child processes started by fork, and the registry that outlives them.
 *
 * luamp_fork() is the only place the runtime forks: stdio is flushed first (so nothing
 * prints twice), every signal is blocked across the fork (so no handler runs in a
 * half-made child), and the child resets the state it must not share with its parent.
 * That state belongs to other files (the arena's reference counts, the private loop, the
 * REPL's relay): luamp_fork runs the base's fork hooks (base.h), which those files
 * register, and knows none of them. This file registers its own too (the child list), and
 * its exit hook (luamp_children_finish) and the signals a spawned program gets back.
 *
 * Each child has a C record in a process-wide list, independent of Lua's collector, so
 * that a child whose Process object was dropped is still joined when the program ends
 * (luamp_children_finish: daemons get SIGTERM, then everyone is reaped). Records are
 * reaped by pid only — never waitpid(-1), which would steal other code's children —
 * and watched through a pidfd, which is also the Process sentinel: it becomes readable
 * when the child ends, even if the child's own children live on.
 *
 * A forkserver's children (forkserver.c forks them in its server) are records here too,
 * though not ours to wait for: the server reaps them and sends the exit code on a status
 * socket, the pidfd it handed over is the sentinel, and signals go through the pidfd.
 *
 * The Lua side sees a "luamp.Child" handle: wait, poll, signal, sentinel, close. A
 * handle inherited by a forked child belongs to another process: there it only frees
 * its copy and never kills or reaps anything.
 *
 * Children nobody joins do not pile up: every fork first reaps the children that have
 * ended (as Python's Process.start does), and a reaped child's pidfd is closed at once
 * unless its sentinel was handed out (a number Lua may still wait on; it stays open, or
 * is made, until the handle is closed). The pidfd of a new child is never missing: an
 * fd is reserved before the fork, so a process out of fds fails to start (Value) rather
 * than starting a child it cannot watch.
 *
 * Pool workers (LUAMP_FORK_WORKER) take their descendants with them. A worker leads its
 * own process group, which everything it starts joins unless it moves out of it itself
 * (setsid, setpgid: start_new_session and shell = true subprocesses escape, as with any
 * Unix tool). Whoever reaps a worker SIGKILLs its group first, while the unreaped
 * zombie still holds the group's id (no pid reuse can redirect the kill): so a worker
 * that was terminated, timed out, crashed or was killed leaves nothing behind. A worker's
 * SIGTERM handler, which is also its parent-death signal, SIGKILLs its group at once:
 * that covers the pool's terminate and a parent that died without reaping anyone.
 * Being outside the terminal's foreground group, a worker never sees the terminal's
 * Ctrl-C (it ignores SIGINT anyway: the parent stops the pool) and ignores SIGTTOU and
 * SIGTTIN, so writing to the terminal (with `stty tostop`) or reading it never stops it.
 * The dispositions a worker changed are put back in its children, forked or spawned.
 */
#include <link.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

extern char **environ;

#define CHILD_MT "luamp.Child"

typedef struct child {
  pid_t pid;
  pid_t owner;          /* the process that forked it: only it may wait or signal */
  int pidfd;
  int daemon;
  int group;            /* leads its own process group (a pool worker): killed when reaped */
  int sentinel_out;     /* the pidfd was handed to Lua as the sentinel: keep it open */
  int reaped;
  int exitcode;         /* valid once reaped: status, or -signal */
  int has_handle;       /* a Lua handle still points here */
  int status_fd;        /* forkserver child: the server reports its end here (else -1) */
  struct child *prev, *next;   /* live list, while not reaped */
} child;

/* The registry, on one page of its own, with room for the records of the first
 * CHILD_SLOTS live children (more go to the heap). A page written after a fork while the
 * child runs is a page copied, and on this project's VMs a copy-on-write fault costs tens
 * of microseconds (with a TLB shootdown in the parent): a start writes this page once in
 * the parent (the new record, the list) and once in the child (the fork flags), rather
 * than a heap page, a .bss page and the record's page on each side. */
#define CHILD_SLOTS 32
static struct {
  child *live;                  /* live list, while not reaped */
  int in_daemon;
  int forked_child;             /* made by luamp_fork (or a descendant of one) */
  pid_t parent_at_fork;         /* who forked this process, 0 in the first process */
  int for_process;              /* forked by Process:start (_core.fork_process) */
  uint32_t slots_used;          /* bit i: slot[i] holds a record */
  child slot[CHILD_SLOTS];
} reg __attribute__((aligned(4096)));

/* In a pool worker: the signals whose disposition it changed, and what it inherited. */
static const int worker_signals[] = {SIGINT, SIGTTIN, SIGTTOU, SIGTERM};
#define N_WORKER_SIGNALS (int)(sizeof worker_signals / sizeof worker_signals[0])
static int in_worker;
static struct sigaction worker_inherited[N_WORKER_SIGNALS];

int luamp_is_daemon(void) { return reg.in_daemon; }

int luamp_children_live(void) { return reg.live != NULL; }

static void list_remove(child *c) {
  if (c->prev) c->prev->next = c->next;
  else if (reg.live == c) reg.live = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = c->next = NULL;
}

static void list_push(child *c) {
  c->prev = NULL;
  c->next = reg.live;
  if (reg.live) reg.live->prev = c;
  reg.live = c;
}

static int exitcode_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return -WTERMSIG(status);
  return 255;
}

static int is_slot(const child *c) { return c >= reg.slot && c < reg.slot + CHILD_SLOTS; }

/* Memory for a record: a free slot of the registry page, else the heap. Nothing is
 * written: the slot is only taken by child_init, so l_fork can choose it before the fork
 * and fill it after (nothing else starts a child in between). NULL: out of memory. */
static child *child_alloc(void) {
  uint32_t free_slots = ~reg.slots_used;
  if (free_slots) return &reg.slot[__builtin_ctz(free_slots)];
  return malloc(sizeof(child));
}

/* Memory from child_alloc that never held a record (the start failed). */
static void child_discard(child *c) {
  if (!is_slot(c)) free(c);
}

static void child_init(child *c, pid_t pid, int daemon) {
  if (is_slot(c)) reg.slots_used |= 1u << (c - reg.slot);
  memset(c, 0, sizeof *c);
  c->pid = pid;
  c->owner = luamp_self_pid();
  c->daemon = daemon;
  c->has_handle = 1;
  c->pidfd = -1;
  c->status_fd = -1;
}

static void child_free(child *c) {
  luamp_close_fd(c->pidfd);
  luamp_close_fd(c->status_fd);
  if (is_slot(c)) reg.slots_used &= ~(1u << (c - reg.slot));
  else free(c);
}

/* A forkserver's child (forkserver.c): the server reaps it and sends its exit code, one
 * int32 packet, on the status socket. Returns 1 (with the code) once that came, 0 while
 * the child runs; when the pidfd says it ended and the code has not arrived, waits for
 * it, so that after the sentinel fires the exit code is known at once. With the server
 * gone (EOF), only the pidfd tells the end, and the code is 255 (unknown). */
static int remote_reap(child *c, int block) {
  for (;;) {
    int32_t v;
    ssize_t n;
    do n = recv(c->status_fd, &v, sizeof v, MSG_DONTWAIT); while (n < 0 && errno == EINTR);
    if (n == (ssize_t)sizeof v) {
      /* a code the server could not have sent is a lost status */
      c->exitcode = v >= -64 && v <= 255 ? (int)v : 255;
      return 1;
    }
    struct pollfd p = {.fd = c->pidfd, .events = POLLIN};
    int r;
    if (n >= 0 || errno != EAGAIN) {
      do r = poll(&p, 1, block ? -1 : 0); while (r < 0 && errno == EINTR);
      if (r == 0) return 0;
      c->exitcode = 255;
      return 1;
    }
    if (!block) {
      do r = poll(&p, 1, 0); while (r < 0 && errno == EINTR);
      if (r == 0) return 0;
    }
    struct pollfd st = {.fd = c->status_fd, .events = POLLIN};
    do r = poll(&st, 1, -1); while (r < 0 && errno == EINTR);
  }
}

/* Reaps c if it has ended (or waits for it when `block`). Returns 1 once reaped. A group
 * leader's group is killed between its end and its reaping: until then its zombie keeps
 * the id, so the kill cannot reach a stranger that reused it. */
static int child_reap(child *c, int block) {
  if (c->reaped) return 1;
  int status;
  pid_t r;
  if (c->status_fd >= 0) {
    /* a forkserver's child: the server reaps it (and its group) and tells us */
    if (!remote_reap(c, block)) return 0;
    luamp_close_fd(c->status_fd);
    c->status_fd = -1;
    goto reaped;
  }
  if (c->group) {
    siginfo_t si;
    si.si_pid = 0;
    do r = waitid(P_PID, (id_t)c->pid, &si, WEXITED | WNOWAIT | (block ? 0 : WNOHANG));
    while (r < 0 && errno == EINTR);
    if (r == 0 && si.si_pid == 0) return 0;
    if (r == 0) kill(-c->pid, SIGKILL);
  }
  do r = waitpid(c->pid, &status, block ? 0 : WNOHANG); while (r < 0 && errno == EINTR);
  if (r == 0) return 0;
  if (r < 0) {
    /* ECHILD: reaped behind our back (SIGCHLD set to SIG_IGN by a host); the status is
     * lost, so report the conventional "unknown failure" code. */
    c->exitcode = 255;
  } else {
    c->exitcode = exitcode_of(status);
  }
reaped:
  c->reaped = 1;
  list_remove(c);
  if (!c->sentinel_out) {
    /* nobody can be waiting on it: give the fd back now, not when Lua collects c */
    luamp_close_fd(c->pidfd);
    c->pidfd = -1;
  }
  return 1;
}

/* Reaps this process's children that have ended; the records Lua no longer holds go. */
static void reap_ended(void) {
  if (!reg.live) return;
  pid_t me = luamp_self_pid();
  child *next;
  for (child *c = reg.live; c; c = next) {
    next = c->next;
    if (c->owner == me && child_reap(c, 0) && !c->has_handle) child_free(c);
  }
}

/* A forkserver's child is not ours: it is signalled through its pidfd (never a reused pid). */
static int child_kill(child *c, int sig) {
  if (c->status_fd >= 0) return (int)syscall(SYS_pidfd_send_signal, c->pidfd, sig, NULL, 0);
  return kill(c->pid, sig);
}

LUAMP_CHILD_PATH void luamp_children_finish(void) {
  /* a child that started none touches nothing here (not even the wiped page of its pid) */
  if (!reg.live) return;
  pid_t me = luamp_self_pid();
  for (child *c = reg.live; c; c = c->next)
    if (c->owner == me && c->daemon) child_kill(c, SIGTERM);
  while (reg.live) {
    child *c = reg.live;
    if (c->owner != me) { list_remove(c); continue; }
    child_reap(c, 1);
    if (!c->has_handle) child_free(c);
  }
}

/* A worker's SIGTERM (and parent-death signal): its process group goes with it. Only
 * if it does lead its group — never the parent's. Async-signal-safe: kill, getpid, getpgrp. */
static void worker_sigterm(int sig) {
  (void)sig;
  pid_t me = getpid();
  if (getpgrp() == me) kill(0, SIGKILL);
  kill(me, SIGKILL);
}

static void set_disposition(int sig, void (*handler)(int)) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = handler;
  sigemptyset(&sa.sa_mask);
  sigaction(sig, &sa, NULL);
}

/* In a new pool worker (signals still blocked): own process group, dispositions saved
 * for its children and changed, parent-death signal. */
static void become_worker(pid_t parent) {
  setpgid(0, 0);
  for (int i = 0; i < N_WORKER_SIGNALS; i++) sigaction(worker_signals[i], NULL, &worker_inherited[i]);
  in_worker = 1;
  set_disposition(SIGINT, SIG_IGN);
  set_disposition(SIGTTIN, SIG_IGN);
  set_disposition(SIGTTOU, SIG_IGN);
  set_disposition(SIGTERM, worker_sigterm);
  prctl(PR_SET_PDEATHSIG, SIGTERM);
  /* the parent died before prctl: nobody will send the signal */
  if (getppid() != parent) worker_sigterm(SIGTERM);
}

/* The exec hook (luamp_atspawn): a worker's changed dispositions go back to default in
 * the programs it spawns. */
static void worker_sigdefault(sigset_t *set) {
  if (!in_worker) return;
  for (int i = 0; i < N_WORKER_SIGNALS; i++)
    if (worker_inherited[i].sa_handler != SIG_IGN) sigaddset(set, worker_signals[i]);
}

/* The fork hook (in any luamp fork's child): nothing in the inherited list is ours to
 * wait for. */
LUAMP_CHILD_PATH static void children_after_fork(void) {
  if (reg.live) reg.live = NULL;
}

/* Set by l_fork around its luamp_fork, for reset_after_fork in the child. */
static int forking_for_process;

/* In a new child of luamp_fork, after the fork hooks: what `daemon` asks for. */
LUAMP_CHILD_PATH static void reset_after_fork(int daemon, pid_t parent) {
  reg.forked_child = 1;
  reg.in_daemon = daemon == LUAMP_FORK_DAEMON;
  reg.parent_at_fork = parent;
  reg.for_process = forking_for_process;
  if (in_worker) {
    /* a worker's child: what the worker changed for itself is not inherited */
    for (int i = 0; i < N_WORKER_SIGNALS; i++) sigaction(worker_signals[i], &worker_inherited[i], NULL);
    in_worker = 0;
  }
  if (daemon == LUAMP_FORK_WORKER) {
    become_worker(parent);
  } else if (daemon) {
    /* A daemon dies with its parent; if the parent is already gone (the race between
     * fork and prctl), go now. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(1);
  }
}

/* ---- the code a child runs, mapped from its first instruction -------------------------
 * fork() copies the page tables of anonymous memory but not of file mappings that never
 * had a private page: a child starts with none of the program's code or read-only data
 * mapped, and faults in every page of it that it runs or reads (the fork's return path in
 * libc, luamp's fork hooks, the Lua interpreter, stdio's flush...), each fault as dear
 * as a copied page. The kernel does copy a file mapping's page tables once the mapping
 * has an anonymous page (an anon_vma): one byte of each read-only segment of the objects
 * a child runs (luamp's, Lua's, libc's) is written back with its own value through
 * /proc/self/mem, which gives that segment a private copy of one page (4 KiB) and every
 * later child the parent's mapping of the rest. Nothing changes if /proc/self/mem cannot
 * be written (a kernel that forbids forced writes, no /proc): children fault as before. */
typedef struct {
  const void *const *in;   /* addresses: the objects holding them are shared */
  int n;
  int mem;                 /* /proc/self/mem, open for writing */
} code_objects;

static int map_code_segments(struct dl_phdr_info *info, size_t size, void *data) {
  (void)size;
  code_objects *co = data;
  int ours = 0;
  for (int i = 0; i < info->dlpi_phnum && !ours; i++) {
    const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
    if (ph->p_type != PT_LOAD) continue;
    uintptr_t lo = info->dlpi_addr + ph->p_vaddr, hi = lo + ph->p_memsz;
    for (int k = 0; k < co->n; k++)
      if ((uintptr_t)co->in[k] >= lo && (uintptr_t)co->in[k] < hi) ours = 1;
  }
  if (!ours) return 0;
  long page = sysconf(_SC_PAGESIZE);
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
    if (ph->p_type != PT_LOAD || (ph->p_flags & PF_W) || ph->p_memsz < (size_t)page * 3) continue;
    /* a page in the middle: the first and last may share a mapping with a neighbour */
    uintptr_t at = (info->dlpi_addr + ph->p_vaddr + ph->p_memsz / 2) & ~(uintptr_t)(page - 1);
    unsigned char b = *(volatile unsigned char *)at;
    ssize_t w;
    do w = pwrite(co->mem, &b, 1, (off_t)at); while (w < 0 && errno == EINTR);
  }
  return 0;
}

static void share_code_page_tables(void) {
  static int done;
  if (done) return;
  done = 1;
  const void *in[] = {(void *)luamp_fork, (void *)lua_pcallk, (void *)fork};
  code_objects co = {in, (int)(sizeof in / sizeof in[0]), -1};
  do co.mem = open("/proc/self/mem", O_RDWR | O_CLOEXEC); while (co.mem < 0 && errno == EINTR);
  if (co.mem < 0) return;
  dl_iterate_phdr(map_code_segments, &co);
  luamp_close_fd(co.mem);
}


LUAMP_CHILD_PATH pid_t luamp_fork(int daemon) {
  sigset_t all, old;
  pid_t parent = luamp_self_pid();
  share_code_page_tables();
  luamp_flush_stdio();
  sigfillset(&all);
  sigprocmask(SIG_BLOCK, &all, &old);
  luamp_fork_prepare();
  pid_t pid = fork();
  int saved = errno;   /* (restored only if changed: errno's TLS page is not rewritten) */
  if (pid == 0) {
    luamp_fork_child();
    reset_after_fork(daemon, parent);
  } else {
    luamp_fork_parent(pid);
  }
  sigprocmask(SIG_SETMASK, &old, NULL);
  if (errno != saved) errno = saved;
  return pid;
}

/* Leaves a child process: stdio is flushed (what it printed goes out before its own
 * children are waited for, as Python flushes before joining them), the exit hooks settle
 * those children and give back the shared objects it inherited, stdio is flushed again,
 * and no atexit handler or finalizer of the parent's program runs. */
LUAMP_CHILD_PATH _Noreturn void luamp_child_exit(int code) {
  luamp_flush_stdio();
  luamp_exit_hooks_run(LUAMP_AT_CHILD_EXIT);
  luamp_flush_stdio();
  _exit(code & 0xff);
}

static int pidfd_open_cloexec(pid_t pid) {
  /* pidfds are always close-on-exec */
  return (int)syscall(SYS_pidfd_open, pid, 0);
}

/* The fd a new child's pidfd can take. A start holds one open before it forks (made by
 * the first start, and again after one used it), so that a process out of fds fails to
 * start (Value) rather than starting a child it cannot watch; the pidfd is opened without
 * it unless the fd table is full. Kept from one start to the next, not made and closed
 * around every fork: two system calls in the parent and one in the child fewer. A forked
 * child inherits it (close-on-exec, like every fd of luamp's) as its own. */
static int spare_fd = -1;

static int hold_spare_fd(void) {
  if (spare_fd < 0) spare_fd = eventfd(0, EFD_CLOEXEC);
  return spare_fd;
}

/* The pidfd of a child just started, in the slot of the spare if it has to. */
static int open_child_pidfd(pid_t pid) {
  int fd = pidfd_open_cloexec(pid);
  if (fd < 0 && (errno == EMFILE || errno == ENFILE) && spare_fd >= 0) {
    luamp_close_fd(spare_fd);
    spare_fd = -1;
    fd = pidfd_open_cloexec(pid);
  }
  return fd;
}

/* ---- Lua binding ---------------------------------------------------------------------- */

typedef struct { child *c; } child_ud;

static child *check_child(lua_State *L) {
  child_ud *u = luaL_checkudata(L, 1, CHILD_MT);
  if (!u->c) luamp_raise(L, "Value", "process object is closed");
  return u->c;
}

static child *check_own_child(lua_State *L) {
  child *c = check_child(L);
  if (c->owner != luamp_self_pid()) luamp_raise(L, "Value", "can only wait for or signal a child of this process");
  return c;
}

/* os.exit as a forked child needs it: there (with the arguments of Lua's) it leaves
 * through luamp_child_exit, so that no atexit handler or finalizer of the parent's
 * program runs; in any other process it is the os.exit it took the place of (upvalue 1),
 * called with the same arguments. It is put in place in the parent, before the fork
 * (luamp_install_child_os_exit), not in each child: there writing the os table would
 * copy its page (and the pages the lookup of its name writes), for every child. */
static int l_os_exit(lua_State *L) {
  if (reg.forked_child) {
    int code;
    if (lua_isboolean(L, 1)) code = lua_toboolean(L, 1) ? EXIT_SUCCESS : EXIT_FAILURE;
    else code = (int)luaL_optinteger(L, 1, EXIT_SUCCESS);
    luamp_child_exit(code);
  }
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  return lua_gettop(L);
}

void luamp_install_child_os_exit(lua_State *L) {
  int top = lua_gettop(L);
  lua_pushglobaltable(L);
  lua_pushliteral(L, "os");
  if (lua_rawget(L, -2) == LUA_TTABLE) {
    lua_pushliteral(L, "exit");
    lua_rawget(L, -2);
    if (lua_tocfunction(L, -1) != l_os_exit) {
      lua_pushcclosure(L, l_os_exit, 1);
      lua_pushliteral(L, "exit");
      lua_insert(L, -2);
      lua_rawset(L, -3);
    }
  }
  lua_settop(L, top);
}

/* The first fork runs, in the parent, the library calls every child's prologue makes
 * (xpcall, io.stdout:flush) and the parent itself may never have made. liblua binds
 * its calls lazily, so otherwise each child would resolve them anew: about 16 page
 * faults per child in the dynamic linker (its symbol tables, the GOT page copied), some
 * 9% of a short child's CPU. Resolved here once, every child inherits the binding. Only
 * the real functions are called (C functions; the stdout a file handle), through raw
 * lookups; their errors do not matter (binding happens before a call fails), except a
 * Ctrl-C, which is raised again. */
static int noop(lua_State *L) { (void)L; return 0; }

static int bind_child_calls_body(lua_State *L) {
  lua_pushglobaltable(L);
  int g = lua_gettop(L);
  lua_pushliteral(L, "xpcall");
  if (lua_rawget(L, g) == LUA_TFUNCTION && lua_iscfunction(L, -1)) {
    lua_pushcfunction(L, noop);
    lua_pushcfunction(L, noop);
    lua_call(L, 2, 0);
  }
  lua_settop(L, g);
  lua_pushliteral(L, "io");
  if (lua_rawget(L, g) == LUA_TTABLE) {
    lua_pushliteral(L, "stdout");
    if (lua_rawget(L, -2) == LUA_TUSERDATA && luaL_testudata(L, -1, LUA_FILEHANDLE) &&
        lua_getfield(L, -1, "flush") == LUA_TFUNCTION && lua_iscfunction(L, -1)) {
      lua_pushvalue(L, -2);
      lua_call(L, 1, 0);
    }
  }
  return 0;
}

static void bind_child_calls(lua_State *L) {
  static int done;
  if (done) return;
  done = 1;
  int top = lua_gettop(L);
  lua_pushcfunction(L, bind_child_calls_body);
  if (lua_pcall(L, 0, 0, 0) != LUA_OK && luamp_is_interrupted(L, -1)) lua_error(L);
  lua_settop(L, top);
}

/* The child of _core.fork(entry, daemon, ...): entry(...); the exit code is its integer
 * result (0 if none, 1 if it raised). */
LUAMP_CHILD_PATH static _Noreturn void run_entry(lua_State *L, int nargs) {
  lua_pushvalue(L, 1);
  for (int i = 0; i < nargs; i++) lua_pushvalue(L, 3 + i);
  int code = 0;
  if (lua_pcall(L, nargs, 1, 0) != LUA_OK) {
    fprintf(stderr, "%s\n", luaL_tolstring(L, -1, NULL));
    code = 1;
  } else if (lua_isinteger(L, -1)) {
    code = (int)lua_tointeger(L, -1);
  }
  luamp_child_exit(code);
}

/* The child of _core.fork_process(daemon, handler, failed, self, fn, ...): fn(...) under
 * the message handler, exit code 0; if it raised, failed(self, what the handler made)
 * reports it and gives the exit code (1 if it raised too, or gave no integer). What
 * xpcall would do, from C: a Lua function of its own between the fork and the target
 * was more of the parent's pages for the child to touch (its closure, prototype and code,
 * the interpreter's vararg and xpcall code). */
LUAMP_CHILD_PATH static _Noreturn void run_process(lua_State *L, int nargs) {
  lua_pushvalue(L, 5);
  for (int i = 1; i <= nargs; i++) lua_pushvalue(L, 5 + i);
  if (lua_pcall(L, nargs, 0, 2) == LUA_OK) luamp_child_exit(0);
  lua_pushvalue(L, 3);
  lua_insert(L, -2);
  lua_pushvalue(L, 4);
  lua_insert(L, -2);
  int code = 1;
  if (lua_pcall(L, 2, 1, 0) != LUA_OK) fprintf(stderr, "%s\n", luaL_tolstring(L, -1, NULL));
  else if (lua_isinteger(L, -1)) code = (int)lua_tointeger(L, -1);
  luamp_child_exit(code);
}

static int fork_kind(lua_State *L, int idx) {
  if (lua_type(L, idx) == LUA_TSTRING && strcmp(lua_tostring(L, idx), "worker") == 0) return LUAMP_FORK_WORKER;
  return lua_toboolean(L, idx) ? LUAMP_FORK_DAEMON : LUAMP_FORK_PLAIN;
}

/* _core.fork(entry, [daemon], ...) -> Child handle in the parent. In the child, calls
 * entry(...) and exits with its integer result (0 if none, 1 if it raised); never
 * returns. daemon: true for a daemon, "worker" for a pool worker (see LUAMP_FORK_WORKER).
 * The arguments spare the caller a closure made for every child.
 * _core.fork_process(daemon, handler, failed, self, fn, ...): Process:start's fork (see
 * run_process), which the child can tell (process_child_of). */
LUAMP_CHILD_PATH static int fork_entry(lua_State *L, int for_process) {
  int entry = for_process ? 5 : 1;
  luaL_checktype(L, entry, LUA_TFUNCTION);
  if (for_process) {
    luaL_checktype(L, 2, LUA_TFUNCTION);
    luaL_checktype(L, 3, LUA_TFUNCTION);
  }
  int nargs = lua_gettop(L) - entry;
  if (!for_process && nargs > 0) nargs--;   /* the daemon argument, between entry and args */
  int daemon = fork_kind(L, for_process ? 1 : 2);
  if (reg.in_daemon) luamp_raise(L, "Value", "daemonic processes are not allowed to have children");
  bind_child_calls(L);
  luamp_install_child_os_exit(L);
  reap_ended();
  child_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->c = NULL;
  luaL_setmetatable(L, CHILD_MT);
  if (hold_spare_fd() < 0) luamp_raise_errno(L, "Value", "cannot start a process", errno);
  child *c = child_alloc();
  if (!c) luamp_raise(L, "Value", "out of memory");
  /* The handle points at its record from before the fork, so that after it the parent
   * writes the registry page and no other. The child's copy of the handle is never used:
   * the child leaves from inside this call (luamp_child_exit), the handle still on its
   * stack. */
  u->c = c;
  if (forking_for_process != for_process) forking_for_process = for_process;
  pid_t pid = luamp_fork(daemon);
  if (pid < 0) {
    int err = errno;
    u->c = NULL;
    child_discard(c);
    luamp_raise_errno(L, "Value", "fork", err);
  }
  if (pid == 0) {
    /* the entry and its arguments are below the handle pushed above */
    if (for_process) run_process(L, nargs);
    run_entry(L, nargs);
  }
  child_init(c, pid, daemon);
  if (daemon == LUAMP_FORK_WORKER) {
    c->group = 1;
    setpgid(pid, pid);   /* as the child does: whichever runs first makes the group */
  }
  c->pidfd = open_child_pidfd(pid);
  if (c->pidfd < 0 && errno != ENOSYS) {
    /* Only another thread can have taken the spare fd. The child has only just
     * started: it goes (with its group) rather than run unwatched. */
    int err = errno;
    kill(pid, SIGKILL);
    child_reap(c, 1);
    u->c = NULL;
    child_free(c);
    luamp_raise_errno(L, "Value", "cannot start a process (pidfd_open)", err);
  }
  list_push(c);
  return 1;
}

static int l_fork(lua_State *L) { return fork_entry(L, 0); }
static int l_fork_process(lua_State *L) { return fork_entry(L, 1); }

/* _core.process_child_of(pid) -> whether this process was forked by Process:start in the
 * process `pid` (its bookkeeping inherited from there is its own to take over: see own()
 * in process.lua). A process forked from such a child by anything else (a library's raw
 * fork) answers for that child's parent, whose bookkeeping it also inherited. */
static int l_process_child_of(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  lua_pushboolean(L, reg.for_process && reg.parent_at_fork == pid);
  return 1;
}

/* ---- spawn start method ---------------------------------------------------------------
 * The child is a fresh luamp interpreter (the executable from luamp_spawn_executable)
 * started with posix_spawn; glibc's posix_spawn reports a failed exec as its result, so
 * a child that cannot start raises here, at start(). Its only descriptors are stdio and
 * LUAMP_SPAWN_FD, one end of a socketpair on which the start message arrives as a frame
 * (runtime/spawn.c reads it); every other fd is closed by the spawn. From then on the
 * child is watched and reaped exactly like a forked one. */

/* Sends the whole frame; a child that died early (EPIPE, ECONNRESET) is not an error
 * here: its exit code tells. MSG_NOSIGNAL: no SIGPIPE. */
static void send_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;
    }
    p += w;
    n -= (size_t)w;
  }
}

/* The frame's header, with the descriptors of the message's handles as SCM_RIGHTS on it
 * (at most LUAMP_MAX_FDS). */
static void send_head(int fd, const char *head, size_t n, const luamp_fdlist *fds) {
  if (!fds || fds->n == 0) {
    send_all(fd, head, n);
    return;
  }
  union { char buf[CMSG_SPACE(sizeof(int) * LUAMP_MAX_FDS)]; struct cmsghdr align; } u;
  memset(&u, 0, sizeof u);
  struct iovec iov = {.iov_base = (void *)head, .iov_len = n};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                      .msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)fds->n)};
  struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)fds->n);
  memcpy(CMSG_DATA(cm), fds->fd, sizeof(int) * (size_t)fds->n);
  ssize_t w;
  do w = sendmsg(fd, &mh, MSG_NOSIGNAL); while (w < 0 && errno == EINTR);
  if (w > 0 && (size_t)w < n) send_all(fd, head + w, n - (size_t)w);
}

/* the frame: magic, then the message's length (8 bytes, little-endian), then it */
void luamp_spawn_send_frame(int fd, const char *msg, size_t len, const luamp_fdlist *fds) {
  char head[LUAMP_SPAWN_HEADER];
  memcpy(head, LUAMP_SPAWN_MAGIC, 8);
  for (int i = 0; i < 8; i++) head[8 + i] = (char)(((uint64_t)len >> (8 * i)) & 0xff);
  send_head(fd, head, sizeof head, fds);
  send_all(fd, msg, len);
}

static int spawn_child(const char *exe, int fd, int own_group, pid_t *pid) {
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  int rc = posix_spawn_file_actions_init(&fa);
  if (rc) return rc;
  rc = posix_spawnattr_init(&at);
  if (rc) {
    posix_spawn_file_actions_destroy(&fa);
    return rc;
  }
  rc = posix_spawn_file_actions_adddup2(&fa, fd, LUAMP_SPAWN_FD);
  if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&fa, LUAMP_SPAWN_FD + 1);
  sigset_t none, dfl;
  sigemptyset(&none);
  sigemptyset(&dfl);
  luamp_spawn_sigdefault(&dfl);
  /* a pool worker leads its own process group from the start (see become_worker) */
  short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | (own_group ? POSIX_SPAWN_SETPGROUP : 0);
  if (rc == 0) rc = posix_spawnattr_setflags(&at, flags);
  if (rc == 0 && own_group) rc = posix_spawnattr_setpgroup(&at, 0);
  if (rc == 0) rc = posix_spawnattr_setsigmask(&at, &none);
  if (rc == 0) rc = posix_spawnattr_setsigdefault(&at, &dfl);
  char fdarg[16];
  snprintf(fdarg, sizeof fdarg, "%d", LUAMP_SPAWN_FD);
  char *argv[] = {(char *)exe, (char *)LUAMP_SPAWN_ARG, fdarg, NULL};
  if (rc == 0) rc = posix_spawn(pid, exe, &fa, &at, argv, environ);
  posix_spawnattr_destroy(&at);
  posix_spawn_file_actions_destroy(&fa);
  return rc;
}

/* _core.spawn(message, daemon, fds) -> Child handle: starts a spawn child and sends it
 * the start message (a string made by process.lua). */
static int l_spawn(lua_State *L) {
  size_t len;
  const char *msg = luaL_checklstring(L, 1, &len);
  luamp_fdlist *fds = luamp_fds_check_bundle(L, 3);
  int daemon = lua_type(L, 2) == LUA_TSTRING && strcmp(lua_tostring(L, 2), "worker") == 0
             ? LUAMP_FORK_WORKER : lua_toboolean(L, 2) ? LUAMP_FORK_DAEMON : LUAMP_FORK_PLAIN;
  if (reg.in_daemon) luamp_raise(L, "Value", "daemonic processes are not allowed to have children");
  const char *exe = luamp_spawn_executable();
  if (!exe) luamp_raise(L, "Value", "cannot start a process: no luamp executable is known (luamp.set_executable)");
  if (len > LUAMP_SPAWN_MAX) luamp_raise(L, "Value", "cannot start a process: the target and args are too large");
  reap_ended();
  child_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->c = NULL;
  luaL_setmetatable(L, CHILD_MT);
  int sv[2] = {-1, -1};
  /* the pidfd's fd, as in l_fork */
  if (hold_spare_fd() < 0) luamp_raise_errno(L, "Value", "cannot start a process", errno);
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
    luamp_raise_errno(L, "Value", "cannot start a process", errno);
  /* adddup2 onto the same number would keep FD_CLOEXEC: never let the child's end be it */
  if (sv[1] == LUAMP_SPAWN_FD) {
    int moved = fcntl(sv[1], F_DUPFD_CLOEXEC, LUAMP_SPAWN_FD + 1);
    luamp_close_fd(sv[1]);
    sv[1] = moved;
  }
  child *c = sv[1] >= 0 ? child_alloc() : NULL;
  if (!c) {
    luamp_close_fd(sv[0]);
    luamp_close_fd(sv[1]);
    luamp_raise(L, "Value", "cannot start a process: out of memory or fds");
  }
  fflush(NULL);
  pid_t pid;
  int rc = spawn_child(exe, sv[1], daemon == LUAMP_FORK_WORKER, &pid);
  luamp_close_fd(sv[1]);
  if (rc != 0) {
    child_discard(c);
    luamp_close_fd(sv[0]);
    lua_pushfstring(L, "cannot start a process: %s", exe);
    luamp_raise_errno(L, "Value", lua_tostring(L, -1), rc);
  }
  child_init(c, pid, daemon);
  c->group = daemon == LUAMP_FORK_WORKER;
  c->pidfd = open_child_pidfd(pid);
  if (c->pidfd < 0 && errno != ENOSYS) {
    int err = errno;
    luamp_close_fd(sv[0]);
    kill(pid, SIGKILL);
    child_reap(c, 1);
    child_free(c);
    luamp_raise_errno(L, "Value", "cannot start a process (pidfd_open)", err);
  }
  list_push(c);
  u->c = c;
  luamp_spawn_send_frame(sv[0], msg, len, fds);
  luamp_close_fd(sv[0]);
  return 1;
}

void luamp_reap_ended(void) { reap_ended(); }

void luamp_child_push_remote(lua_State *L, pid_t pid, int pidfd, int status_fd, int daemon) {
  child_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->c = NULL;
  luaL_setmetatable(L, CHILD_MT);
  child *c = child_alloc();
  if (!c) {
    /* it runs unwatched and unreaped by us: end it (the server reaps it) */
    syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
    luamp_close_fd(pidfd);
    luamp_close_fd(status_fd);
    luamp_raise(L, "Value", "out of memory");
  }
  child_init(c, pid, daemon);
  c->pidfd = pidfd;
  c->status_fd = status_fd;
  list_push(c);
  u->c = c;
}

int luamp_forkserver_child;
int luamp_spawned;

/* _core.spawned() -> true in a spawn child, a forkserver or a forkserver's child */
static int l_spawned(lua_State *L) {
  lua_pushboolean(L, luamp_spawned);
  return 1;
}

/* _core.spawn_child_setup(daemon, parent_pid): in a spawn child, before any of the
 * parent's code runs. A daemon dies with its parent; if the parent is already gone (it
 * died before prctl), go now. */
static int l_spawn_child_setup(lua_State *L) {
  int worker = lua_type(L, 1) == LUA_TSTRING && strcmp(lua_tostring(L, 1), "worker") == 0;
  int daemon = !worker && lua_toboolean(L, 1);
  pid_t parent = (pid_t)luaL_checkinteger(L, 2);
  reg.parent_at_fork = parent;
  /* forked by a forkserver: the fork set it up against the server, its real parent */
  if (luamp_forkserver_child) return 0;
  reg.in_daemon = daemon;
  if (worker) {
    become_worker(parent);
  } else if (daemon) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(1);
  }
  return 0;
}

static int l_set_executable(lua_State *L) {
  luamp_set_executable(luaL_checkstring(L, 1));
  return 0;
}

static int l_child_pid(lua_State *L) {
  lua_pushinteger(L, check_child(L)->pid);
  return 1;
}

/* The pidfd, kept open from now on. A child reaped before anyone asked has closed its
 * pidfd; it gets an fd that is always readable, as the pidfd of an ended child is. */
static int l_child_sentinel(lua_State *L) {
  child *c = check_child(L);
  if (c->pidfd < 0 && c->reaped) {
    c->pidfd = eventfd(1, EFD_CLOEXEC);
    if (c->pidfd < 0) luamp_raise_errno(L, "Value", "sentinel", errno);
  }
  c->sentinel_out = 1;
  lua_pushinteger(L, c->pidfd);
  return 1;
}

/* :ended() -> exitcode if the child is known to have ended (reaped), else nil; no
 * system call. */
static int l_child_ended(lua_State *L) {
  child *c = check_child(L);
  if (!c->reaped) return 0;
  lua_pushinteger(L, c->exitcode);
  return 1;
}

/* :poll() -> exitcode or nil while running */
static int l_child_poll(lua_State *L) {
  child *c = check_own_child(L);
  if (!child_reap(c, 0)) return 0;
  lua_pushinteger(L, c->exitcode);
  return 1;
}

/* :wait([timeout]) -> exitcode, or nil if the timeout passed first */
static int l_child_wait(lua_State *L) {
  child *c = check_own_child(L);
  double deadline = luamp_deadline_arg(L, 2);
  /* A child with a pidfd is waited for first and reaped once that says it ended: one
   * system call fewer than looking first, for the usual join of a running child. */
  int look = c->reaped || c->pidfd < 0 || c->status_fd >= 0;
  while (!(look && child_reap(c, 0))) {
    look = 1;
    struct pollfd pfd = {.fd = c->pidfd, .events = POLLIN};
    int n;
    if (c->pidfd >= 0) {
      n = luamp_wait_fds(&pfd, 1, deadline);
    } else {
      /* no pidfd (kernel before 5.3): look again every 10 ms */
      double tick = luamp_now() + 0.01;
      n = luamp_wait_fds(NULL, 0, deadline >= 0 && deadline < tick ? deadline : tick);
      if (n == 0 && (deadline < 0 || luamp_now() < deadline)) continue;
    }
    if (n == 0) return 0;
    if (n == -2) {
      luamp_take_interrupt();
      luamp_raise(L, "Interrupted", "interrupted while joining process %d", (int)c->pid);
    }
    if (n < 0) luamp_raise_errno(L, "Value", "join", errno);
  }
  lua_pushinteger(L, c->exitcode);
  return 1;
}

/* :signal(signum): a no-op once the child has been reaped (its pid may be reused). */
static int l_child_signal(lua_State *L) {
  child *c = check_own_child(L);
  int sig = (int)luaL_checkinteger(L, 2);
  if (!c->reaped && child_kill(c, sig) < 0 && errno != ESRCH)
    luamp_raise_errno(L, "Value", "kill", errno);
  return 0;
}

static void child_release(child_ud *u) {
  child *c = u->c;
  if (!c) return;
  u->c = NULL;
  if (c->owner != luamp_self_pid()) { child_free(c); return; }   /* our copy of a parent's record */
  c->has_handle = 0;
  if (c->reaped) child_free(c);   /* else luamp_children_finish frees it */
}

/* :close(): running -> Value; idempotent */
static int l_child_close(lua_State *L) {
  child_ud *u = luaL_checkudata(L, 1, CHILD_MT);
  if (u->c && u->c->owner == luamp_self_pid() && !child_reap(u->c, 0))
    luamp_raise(L, "Value", "cannot close a process while it is still running");
  child_release(u);
  return 0;
}

static int l_child_gc(lua_State *L) {
  child_release(luaL_checkudata(L, 1, CHILD_MT));
  return 0;
}

static int l_child_tostring(lua_State *L) {
  child_ud *u = luaL_checkudata(L, 1, CHILD_MT);
  if (!u->c) lua_pushliteral(L, "<luamp.Child closed>");
  else lua_pushfstring(L, "<luamp.Child pid=%d>", (int)u->c->pid);
  return 1;
}

static int l_getpid(lua_State *L) { lua_pushinteger(L, luamp_self_pid()); return 1; }

/* count_process() -> the number of a Process made in this process (1, 2...);
 * count_process(true) starts again from 1 (a spawn child: its first Process was its
 * own). The count lives on the page every child finds zero (base.h), which a parent
 * writes with no page fault after a fork: a Lua counter's page was one more the parent
 * wrote, write-protected, between one start and the next. */
static int l_count_process(lua_State *L) {
  if (lua_toboolean(L, 1)) {
    luamp_self.s.processes_made = 0;
    return 0;
  }
  luamp_self_pid();   /* the page is wiped in children once set up (base.c) */
  lua_pushinteger(L, ++luamp_self.s.processes_made);
  return 1;
}
static int l_getppid(lua_State *L) { lua_pushinteger(L, getppid()); return 1; }
static int l_is_daemon(lua_State *L) { lua_pushboolean(L, reg.in_daemon); return 1; }

/* the pid of the process that forked this one, or nil in the first process */
static int l_parent_pid(lua_State *L) {
  if (!reg.parent_at_fork) return 0;
  lua_pushinteger(L, reg.parent_at_fork);
  return 1;
}

static int l_cpu_count(lua_State *L) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  lua_pushinteger(L, n > 0 ? n : 1);
  return 1;
}

/* pid_alive(pid, [pidfd]) -> boolean: for processes we did not fork (the parent). */
static int l_pid_alive(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  lua_pushboolean(L, kill(pid, 0) == 0 || errno == EPERM);
  return 1;
}

/* pidfd_open(pid) -> fd that becomes readable when pid ends, or nil, message */
static int l_pidfd_open(lua_State *L) {
  int fd = pidfd_open_cloexec((pid_t)luaL_checkinteger(L, 1));
  if (fd < 0) {
    lua_pushnil(L);
    lua_pushstring(L, strerror(errno));
    return 2;
  }
  lua_pushinteger(L, fd);
  return 1;
}

static int l_close_fd(lua_State *L) {
  luamp_close_fd((int)luaL_checkinteger(L, 1));
  return 0;
}

int luamp_open_process(lua_State *L) {
  luamp_atfork(NULL, NULL, children_after_fork);
  luamp_atexit(luamp_children_finish, LUAMP_AT_END | LUAMP_AT_CHILD_EXIT);
  luamp_atspawn(worker_sigdefault);
  static const luaL_Reg child_methods[] = {
    {"pid", l_child_pid},
    {"sentinel", l_child_sentinel},
    {"ended", l_child_ended},
    {"poll", l_child_poll},
    {"wait", l_child_wait},
    {"signal", l_child_signal},
    {"close", l_child_close},
    {NULL, NULL}
  };
  static const luaL_Reg child_meta[] = {
    {"__gc", l_child_gc},
    {"__close", l_child_gc},
    {"__tostring", l_child_tostring},
    {"__index", NULL},
    {NULL, NULL}
  };
  static const luaL_Reg fns[] = {
    {"fork", l_fork},
    {"fork_process", l_fork_process},
    {"process_child_of", l_process_child_of},
    {"spawn", l_spawn},
    {"spawn_child_setup", l_spawn_child_setup},
    {"spawned", l_spawned},
    {"set_executable", l_set_executable},
    {"getpid", l_getpid},
    {"count_process", l_count_process},
    {"getppid", l_getppid},
    {"is_daemon", l_is_daemon},
    {"parent_pid", l_parent_pid},
    {"cpu_count", l_cpu_count},
    {"pid_alive", l_pid_alive},
    {"pidfd_open", l_pidfd_open},
    {"close_fd", l_close_fd},
    {NULL, NULL}
  };
  if (luaL_newmetatable(L, CHILD_MT)) {
    luaL_setfuncs(L, child_meta, 0);
    luaL_newlib(L, child_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  luaL_setfuncs(L, fns, 0);
  lua_pushinteger(L, SIGTERM);
  lua_setfield(L, -2, "SIGTERM");
  lua_pushinteger(L, SIGKILL);
  lua_setfield(L, -2, "SIGKILL");
  return 0;
}
