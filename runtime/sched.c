/*
 * sched.c — the task scheduler: luamp.task coroutines, each of whose waits suspends only
 * that task, and the one wait that serves them all.
 *
 * Mechanism: a task is a Lua thread; it runs on a runner, a C stack (mmap'd, with a guard
 * page) whose loop calls lua_resume on it. A blocking call inside a task needs no change
 * of its own: every luamp wait already ends in luamp_wait_fds (fds + deadline) or
 * luamp_futex_wait (a futex word), and both hand over to this file when they run inside
 * a task: the task records what it waits for and switches back to the main context (a
 * few instructions on x86-64, swapcontext elsewhere), keeping its runner. The C frames of
 * the waiting call (its locks, buffers and fds) stay on that stack untouched until the
 * task is resumed, and the wait then returns as it would have: the number of ready fds, 0
 * at the deadline, or -2 (Interrupted) when the task was cancelled. So Queue get, recv,
 * join, Popen:wait, manager calls, AsyncResult:get and sleep all cooperate, and so do
 * user coroutines inside a task (their resume frames live on the runner's stack).
 * A wait that holds nothing in C can instead suspend by a Lua yield with a continuation
 * (lua_yieldk; luamp_sched_turn_yield): lua_resume returns, the runner goes back to the
 * free list, and the task holds no C stack while it waits. A new task has no stack
 * either. So 10,000 tasks in line for a queue cost 10,000 Lua threads and one runner.
 * A bare coroutine.yield of the task's own thread is a sleep(0).
 *
 * Turns: tasks of this process waiting on the same queue class take turns (see
 * luamp_sched_turn_wait): one registers in the queue and polls its eventfd, the others
 * wait in line here, and each that leaves hands the turn to the next, which finds an
 * item left or becomes the one registered. One token from another process thus serves a
 * whole backlog with task switches and no system call. Better still, a getter that got
 * its item hands the small items left straight to the tasks given the turn and not run
 * yet (luamp_sched_turn_hand_on, under one queue lock for the lot): each of them returns
 * its item when it runs, without the queue. A task handed an item and cancelled before it
 * runs passes it to the next such task (and raises Interrupted), or keeps it when there
 * is none (the cancel is then for its next wait): an item handed is never lost.
 *
 * Ends: a task is a userdata (the Task; this struct) whose thread runs the task function
 * directly. When it returns, its results stay on its thread for Task:wait and it leaves
 * the live slots; when it raises, the traceback and error are recorded on the helper
 * thread (and its to-be-closed variables closed), and run() raises the first nobody
 * waited for. No Lua code runs and nothing is allocated when a task returns.
 *
 * The main context is whoever is not a task: luamp.run, Task:wait outside a task, or any
 * blocking call made outside a task while tasks exist. Its waits (main_wait) run the
 * ready tasks, then make one poll(2) over the caller's own fds, the background pumps'
 * fds (wait.c), one entry per distinct fd that tasks wait on, and the futex bridge's
 * eventfd, with the nearest task deadline as timeout. Readiness marks the waiting tasks
 * ready; they run at the next round (while tasks make each other ready, up to POLL_EVERY
 * rounds run without a poll). Tasks are resumed only from the main context, never
 * from inside a task and never from inside a pump, so contexts never nest.
 *
 * Waiters of one fd: all are woken when it is ready (readiness is a hint; each caller
 * re-checks), except those that asked for LUAMP_POLL_ONE (a Queue's token eventfd: one
 * token per registered waiter), of which one per round is woken; poll is level
 * triggered, so the next round wakes the next while tokens remain.
 *
 * Futex words (Lock, Semaphore, Event, Condition, Barrier) are not pollable. A bridge
 * thread (one per process, made on first need, every signal blocked) sleeps in one
 * futex_waitv(2) over the distinct words tasks wait on (up to 127) plus a control word,
 * and on a wake or a changed value writes the bridge eventfd and waits for the main
 * context to republish the set. Nothing polls: a waker's FUTEX_WAKE reaches the bridge
 * like any waiter. Without futex_waitv (kernel before 5.16), or beyond 127 distinct
 * words, a futex waiter re-checks every FUTEX_FALLBACK seconds instead.
 *
 * Ctrl-C is seen by the main context only (a task's wait never takes the mark):
 * luamp.run then cancels every task. Cancelling makes the task's current wait (or its
 * next one) return -2 once, which every wait turns into Interrupted.
 *
 * Luamp's private libuv loop (subprocesses) is one fd that many tasks wait on, and a
 * step of it in one task runs the callbacks another task waits for: its callbacks count
 * (loop.c), and the scheduler wakes the loop's waiters when the count moves.
 *
 * Layering: this file sits beside wait.c and calls it (the pumps); wait.c reaches the
 * scheduler only through luamp_wait_sched, set by luamp_open_sched.
 *
 * A host loop (luamp_set_loop, found through luamp_host_loop): the same task fds, the nearest deadline and the bridge
 * eventfd are watched from the host's loop (uv_poll, one uv_timer, one uv_idle while
 * tasks are ready), and their callbacks resume the tasks: a host that runs its Lua code
 * as tasks never calls luamp.run. These handles keep the host's loop alive while tasks
 * live.
 *
 * Fork: a child forked inside a task goes on running on that task's runner as its main
 * context (it never returns to the scheduler; it leaves through _exit); the parent's
 * tasks, watches and bridge thread are forgotten in the child (pid check).
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <linux/futex.h>
#include <uv.h>

#ifndef FUTEX2_SIZE_U32
#define FUTEX2_SIZE_U32 0x02
#endif
#ifndef FUTEX2_PRIVATE
#define FUTEX2_PRIVATE FUTEX_PRIVATE_FLAG
#endif

#include "internal.h"

#if defined(__SANITIZE_ADDRESS__)
#define SCHED_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SCHED_ASAN 1
#endif
#endif
#ifdef SCHED_ASAN
#include <sanitizer/common_interface_defs.h>
#define STACK_SIZE ((size_t)2 << 20)
#else
#define STACK_SIZE ((size_t)1 << 20)
#endif
#define SLAB_STACKS 64
#define FUTEX_FALLBACK 0.01
#define BRIDGE_MAX 127

/* ---- context switch --------------------------------------------------------------------- */

#if defined(__x86_64__)
/* Saves the callee-saved registers and the FP control words on the current stack, stores
 * the stack pointer in *save and continues on `to` (a stack saved the same way). */
typedef struct { void *sp; } ctx_t;
void luamp_ctx_switch(void **save, void *to);
__asm__(".text\n"
        ".globl luamp_ctx_switch\n"
        ".hidden luamp_ctx_switch\n"
        ".type luamp_ctx_switch,@function\n"
        "luamp_ctx_switch:\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
        "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
        "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
        "  ret\n"
        ".size luamp_ctx_switch, .-luamp_ctx_switch\n");

static void ctx_make(ctx_t *c, char *stack, size_t size, void (*fn)(void)) {
  uintptr_t top = ((uintptr_t)(stack + size)) & ~(uintptr_t)15;
  void **sp = (void **)top;
  *--sp = NULL;          /* fn's return address: it never returns */
  *--sp = (void *)fn;    /* where the switch's ret goes; 16-aligned slot, as after a call */
  for (int i = 0; i < 6; i++) *--sp = NULL;
  --sp;
  uint32_t cw[2] = {0x1f80, 0x037f};   /* default MXCSR and x87 control word */
  memcpy(sp, cw, sizeof cw);
  c->sp = sp;
}

static void ctx_swap(ctx_t *from, ctx_t *to) { luamp_ctx_switch(&from->sp, to->sp); }
#else
#include <ucontext.h>
typedef struct { ucontext_t uc; } ctx_t;

static void ctx_make(ctx_t *c, char *stack, size_t size, void (*fn)(void)) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = NULL;
  makecontext(&c->uc, fn, 0);
}

static void ctx_swap(ctx_t *from, ctx_t *to) { swapcontext(&from->uc, &to->uc); }
#endif

/* ---- tasks ------------------------------------------------------------------------------ */

enum { T_READY, T_WAIT, T_RUN, T_DONE };
/* how a task ended: running yet, returned, raised, cancelled (or met Interrupted) */
enum { E_RUNNING, E_OK, E_ERROR, E_CANCELLED };
/* what ended a wait */
enum { W_FD, W_TIMEOUT, W_CANCEL, W_FUTEX, W_UNPARK, W_TURN, W_ITEM };

struct task;
typedef struct slab slab;

/* One fd a task waits on, linked into that fd's watch. Lives on the waiting task's stack
 * (or malloc'd there for large sets) for as long as the wait lasts. */
typedef struct wnode {
  struct task *t;
  int i;                    /* index in the task's pollfd array */
  short events;
  int one;                  /* LUAMP_POLL_ONE: woken one per round */
  int linked;
  int w;                    /* index of the watch */
  struct wnode *prev, *next;
} wnode;

typedef struct watch {
  int fd;
  short events;             /* union of the waiters' events */
  int nall;                 /* waiters that are not LUAMP_POLL_ONE */
  int batch;                /* LUAMP_POLL_ONE waiters to wake per readiness (0 means 1) */
  int woken, failed;        /* woken at its last readiness; of them, back without a token */
  wnode *head, *tail;
  uv_poll_t *host;          /* its watch on the host's loop, or NULL */
  short host_events;
} watch;

/* A futex waiter: a task, or the main context (t NULL). */
typedef struct fwaiter {
  _Atomic uint32_t *word;
  uint32_t expect;
  struct task *t;
  int fired;
  struct fwaiter *prev, *next;
} fwaiter;

/* Laid out hot first: the fields a task handed its item touches from the hand-on to its
 * end (taker, hand, wake, the runner, turn_resumed, task_ended) share three or four
 * cache lines, and 10,000 such tasks run one after another. */
typedef struct task {
  lua_State *T;             /* its thread (the Task userdata's user value 1) */
  struct runner *run;       /* the C stack it runs on (kept while it waits in C) */
  struct task *rnext;       /* ready queue */
  struct task *tprev, *tnext;   /* in a turn's line (luamp_sched_turn_wait) */
  const void *turn_key;     /* the turn it waits for after luamp_sched_turn_yield */
  fwaiter *fw;
  struct task *joiners;     /* tasks in Task:wait for it (linked by jnext) */
  double deadline;
  int state;
  int why;                  /* W_: what ended the current wait */
  int cancel;               /* the next wait returns -2 */
  int takes;                /* waits for it by turn_yield: may be handed an item instead */
  int started;
  int nargs;                /* for its next resume: the arguments on T */
  int result;               /* E_: how it ended */
  int nres;                 /* E_OK: its results, the top nres values of T */
  int parked;               /* in task_join: the end of the task it waits for wakes it */
  int hidx;                 /* index in the deadline heap, -1 when not there */
  int nfds;
  int slot;                 /* in slots[] and the anchor table while not DONE */
  size_t item_len;          /* W_ITEM: the item handed to it */
  char item[LUAMP_HAND_MAX];
  /* colder */
  lua_Integer id;
  int cancelled;            /* cancel() was called on it */
  int waited;               /* its results or error were taken (Task:wait, run()) */
  int one_fd;               /* the token fd it was last woken from, -1 none */
  int nready;
  struct task *jnext;
  struct pollfd *fds;       /* the current wait's */
  wnode *nodes;
} task;

/* A C stack that runs tasks: a loop calling lua_resume on the current task. A task that
 * waits in C keeps its runner until it is resumed and suspends otherwise or ends; one
 * that suspends by a Lua yield (luamp_sched_turn_yield) gives it back at once. */
typedef struct runner {
  ctx_t ctx;
  char *stack;
  slab *slab;
  struct runner *next;      /* in the free list */
#ifdef SCHED_ASAN
  void *fake;
#endif
} runner;

static pid_t sched_pid;
static task *current;               /* the running task, NULL in the main context */
static ctx_t main_ctx;
static lua_Integer next_id;
static int live;                    /* tasks not yet DONE */
static unsigned ended;              /* counts tasks that finished */
static task *ready_head, *ready_tail;
/* The last task of the round run_ready is running, NULL once it has been taken (or
 * outside run_ready). */
static task *round_stop;
/* Live tasks by slot: a dense array (what the Ctrl-C of run() and the state's close walk),
 * slots reused through free_slots. The same slot of the anchor table (a Lua table in the
 * registry) holds the Task userdata, whose memory is the task struct, until it ends. */
static task **slots;
static int slots_top, slots_cap;
static int *free_slots;
static int nfree_slots;
static char failed_key;             /* registry key: the failed Tasks */
static lua_State *anchors;          /* a thread whose index 1 is the anchor table */
static lua_State *helper;           /* a thread for the rare ends that run Lua code */
static task **heap;
static int nheap, heap_cap;
static watch *watches;
static int nwatches, watches_cap;
static int *watch_of_fd;            /* fd -> watch index + 1 (0: none) */
static int watch_of_fd_cap;
static fwaiter *fwaiters;
static struct turn *turns;         /* turns in use (luamp_sched_turn_wait) */
static int fw_dirty;
/* Stacks come in slabs of SLAB_STACKS (one mapping each): a slab is unmapped only when
 * all its stacks are free and another free slab is kept, so a burst of thousands of
 * tasks ending costs a few munmaps (each a TLB shootdown), not one per task. */
struct slab {
  char *base;
  int nfree;
  char *free[SLAB_STACKS];
  struct slab *next, *prev;        /* slabs with a free stack */
};
static slab *slabs_with_free;
static int empty_slabs;           /* slabs whose every stack is free */
/* Runners not in use, kept (stack pages and all) up to RUNNERS_KEPT for the next tasks. */
#define RUNNERS_KEPT 256
static runner *free_runners;
static int nfree_runners;
#ifdef SCHED_ASAN
static const void *main_stack_bottom;
static size_t main_stack_size;
#endif

static void host_sync(void);
static void bridge_forget(void);
static void cancel_task(struct task *t);

/* A forked child starts with no tasks of its own: the parent's belong to its program. */
static void forget_if_forked(void) {
  pid_t me = luamp_self_pid();
  if (sched_pid == me) return;
  sched_pid = me;
  current = NULL;
  live = 0;
  ready_head = ready_tail = NULL;
  round_stop = NULL;
  slots_top = 0;
  nfree_slots = 0;
  nheap = 0;
  nwatches = 0;
  if (watch_of_fd) memset(watch_of_fd, 0, sizeof *watch_of_fd * (size_t)watch_of_fd_cap);
  fwaiters = NULL;
  fw_dirty = 0;
  turns = NULL;
  slabs_with_free = NULL;   /* one of the stacks may be the one this child runs on */
  free_runners = NULL;
  nfree_runners = 0;
  empty_slabs = 0;
  bridge_forget();
}

int luamp_sched_active(void) {
  if (!live && !current) return 0;
  forget_if_forked();
  return live || current;
}

int luamp_sched_in_task(void) {
  if (!current) return 0;
  forget_if_forked();
  return current != NULL;
}

int luamp_sched_alone(void) {
  return luamp_sched_in_task() && !ready_head;
}

lua_State *luamp_sched_current_thread(void) {
  task *t = current;
  return t && sched_pid == luamp_self_pid() ? t->T : NULL;
}

static void ready_push(task *t) {
  t->state = T_READY;
  t->rnext = NULL;
  if (ready_tail) ready_tail->rnext = t;
  else ready_head = t;
  ready_tail = t;
}

/* ---- the deadline heap ---- */

static void heap_set(int i, task *t) {
  heap[i] = t;
  t->hidx = i;
}

static void heap_up(int i) {
  task *t = heap[i];
  while (i > 0) {
    int p = (i - 1) / 2;
    if (heap[p]->deadline <= t->deadline) break;
    heap_set(i, heap[p]);
    i = p;
  }
  heap_set(i, t);
}

static void heap_down(int i) {
  task *t = heap[i];
  for (;;) {
    int c = 2 * i + 1;
    if (c >= nheap) break;
    if (c + 1 < nheap && heap[c + 1]->deadline < heap[c]->deadline) c++;
    if (heap[c]->deadline >= t->deadline) break;
    heap_set(i, heap[c]);
    i = c;
  }
  heap_set(i, t);
}

static int heap_push(task *t) {
  if (nheap == heap_cap) {
    int cap = heap_cap ? heap_cap * 2 : 64;
    task **h = realloc(heap, sizeof *h * (size_t)cap);
    if (!h) return -1;
    heap = h;
    heap_cap = cap;
  }
  heap_set(nheap++, t);
  heap_up(nheap - 1);
  return 0;
}

static void heap_remove(task *t) {
  int i = t->hidx;
  if (i < 0) return;
  t->hidx = -1;
  task *last = heap[--nheap];
  if (i == nheap) return;
  heap_set(i, last);
  heap_up(i);
  heap_down(last->hidx);
}

/* ---- fd watches ---- */

static watch *watch_get(int fd) {
  if (fd >= watch_of_fd_cap) {
    int cap = watch_of_fd_cap ? watch_of_fd_cap : 256;
    while (cap <= fd) cap *= 2;
    int *m = realloc(watch_of_fd, sizeof *m * (size_t)cap);
    if (!m) return NULL;
    memset(m + watch_of_fd_cap, 0, sizeof *m * (size_t)(cap - watch_of_fd_cap));
    watch_of_fd = m;
    watch_of_fd_cap = cap;
  }
  if (watch_of_fd[fd]) return &watches[watch_of_fd[fd] - 1];
  if (nwatches == watches_cap) {
    int cap = watches_cap ? watches_cap * 2 : 64;
    watch *w = realloc(watches, sizeof *w * (size_t)cap);
    if (!w) return NULL;
    watches = w;
    watches_cap = cap;
  }
  watch *w = &watches[nwatches++];
  memset(w, 0, sizeof *w);
  w->fd = fd;
  watch_of_fd[fd] = nwatches;
  return w;
}

static void node_unlink(wnode *n) {
  if (!n->linked) return;
  n->linked = 0;
  watch *w = &watches[n->w];
  if (n->prev) n->prev->next = n->next;
  else w->head = n->next;
  if (n->next) n->next->prev = n->prev;
  else w->tail = n->prev;
  if (!n->one) w->nall--;
  if (!w->head) {
    w->events = 0;
  } else if (n->events & ~w->head->events & w->events) {
    /* it may have been the only one wanting those events: recompute */
    short ev = 0;
    for (wnode *m = w->head; m; m = m->next) ev |= m->events;
    w->events = ev;
  }
}

static void host_watch_close(watch *w);

/* Drops the watches nobody waits on (their indices change: done between rounds only). */
static void watches_compact(void) {
  for (int i = 0; i < nwatches;) {
    if (watches[i].head) { i++; continue; }
    host_watch_close(&watches[i]);
    watch_of_fd[watches[i].fd] = 0;
    if (i != nwatches - 1) {
      watches[i] = watches[nwatches - 1];
      watch_of_fd[watches[i].fd] = i + 1;
      for (wnode *n = watches[i].head; n; n = n->next) n->w = i;
      if (watches[i].host) watches[i].host->data = (void *)(intptr_t)watches[i].fd;
    }
    nwatches--;
  }
}

/* ---- waking ---- */

static void fw_unlink(fwaiter *f) {
  if (f->prev) f->prev->next = f->next;
  else fwaiters = f->next;
  if (f->next) f->next->prev = f->prev;
  f->prev = f->next = NULL;
  fw_dirty = 1;
}

/* Ends t's wait for reason `why` and queues it to run. */
static void wake(task *t, int why) {
  if (t->state != T_WAIT) return;
  for (int i = 0; i < t->nfds; i++) node_unlink(&t->nodes[i]);
  t->nfds = 0;
  heap_remove(t);
  if (t->fw) {
    fw_unlink(t->fw);
    t->fw = NULL;
  }
  t->why = why;
  t->parked = 0;
  ready_push(t);
}

/* Wakes the waiters of watch index wi for revents re. Of the LUAMP_POLL_ONE waiters it
 * wakes `batch`: doubled (up to 64) while every one woken last time found its token,
 * halved when some came back without; so a backlog of tokens is served many per poll,
 * and a trickle wakes one waiter per token. */
static void watch_ready(int wi, short re) {
  watch *w = &watches[wi];
  if (w->woken) {
    if (w->failed) w->batch = w->batch / 2 < 1 ? 1 : w->batch / 2;
    else w->batch = w->batch * 2 > 64 ? 64 : (w->batch ? w->batch * 2 : 2);
  }
  int batch = w->batch ? w->batch : 1;
  w->woken = w->failed = 0;
  int ones = 0;
  short always = POLLERR | POLLHUP | POLLNVAL;
  wnode *n = w->head;
  while (n) {
    wnode *next = n->next;
    /* the common case of many token waiters: stop once the batch is woken */
    if (ones >= batch && !(re & always) && w->nall == 0) break;
    short got = re & (n->events | always);
    if (got && (!n->one || ones < batch || (re & always))) {
      if (n->one) {
        ones++;
        n->t->one_fd = w->fd;
      }
      n->t->fds[n->i].revents = got;
      n->t->nready = 1;
      wake(n->t, W_FD);
    }
    n = next;
  }
  w = &watches[wi];
  w->woken = ones;
}

/* A step of luamp's private loop (a subprocess wait, in some task) ran callbacks: the
 * events another task waits for on that loop may be among them, taken from under its
 * wait. Wake the tasks waiting on the loop to look again. */
static unsigned seen_loop_events;
static void check_private_loop(void) {
  unsigned e = luamp_private_loop_events();
  if (e == seen_loop_events) return;
  seen_loop_events = e;
  int fd = luamp_private_loop_fd();
  if (fd >= 0 && fd < watch_of_fd_cap && watch_of_fd[fd]) watch_ready(watch_of_fd[fd] - 1, POLLIN);
}

static void expire_deadlines(double now) {
  while (nheap > 0 && heap[0]->deadline <= now) wake(heap[0], W_TIMEOUT);
}

/* ---- stacks ---- */

static void slab_unlist(slab *sl) {
  if (sl->prev) sl->prev->next = sl->next;
  else slabs_with_free = sl->next;
  if (sl->next) sl->next->prev = sl->prev;
}

static void slab_list(slab *sl) {
  sl->prev = NULL;
  sl->next = slabs_with_free;
  if (slabs_with_free) slabs_with_free->prev = sl;
  slabs_with_free = sl;
}

static char *stack_get(slab **from) {
  slab *sl = slabs_with_free;
  if (!sl) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    sl = malloc(sizeof *sl);
    if (!sl) return NULL;
    sl->base = mmap(NULL, STACK_SIZE * SLAB_STACKS, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (sl->base == MAP_FAILED) {
      free(sl);
      return NULL;
    }
    /* a guard page under each stack: an overflow faults instead of scribbling */
    for (int i = 0; i < SLAB_STACKS; i++) {
      mprotect(sl->base + (size_t)i * STACK_SIZE, page, PROT_NONE);
      sl->free[i] = sl->base + (size_t)(SLAB_STACKS - 1 - i) * STACK_SIZE;
    }
    sl->nfree = SLAB_STACKS;
    empty_slabs++;
    slab_list(sl);
  }
  if (sl->nfree == SLAB_STACKS) empty_slabs--;
  char *s = sl->free[--sl->nfree];
  if (sl->nfree == 0) slab_unlist(sl);
  *from = sl;
  return s;
}

static void stack_put(slab *sl, char *s) {
  if (sl->nfree == 0) slab_list(sl);
  sl->free[sl->nfree++] = s;
  if (sl->nfree < SLAB_STACKS) return;
  if (empty_slabs >= 1) {
    slab_unlist(sl);
    munmap(sl->base, STACK_SIZE * SLAB_STACKS);
    free(sl);
  } else {
    empty_slabs++;
  }
}

/* ---- switching ---- */

/* From a runner back to the main context; returns when the main context switches back. */
static void to_main(runner *r) {
#ifdef SCHED_ASAN
  __sanitizer_start_switch_fiber(&r->fake, main_stack_bottom, main_stack_size);
  ctx_swap(&r->ctx, &main_ctx);
  __sanitizer_finish_switch_fiber(r->fake, &main_stack_bottom, &main_stack_size);
#else
  ctx_swap(&r->ctx, &main_ctx);
#endif
}

static void runner_free(runner *r) {
  stack_put(r->slab, r->stack);
  free(r);
}

static void task_ended(task *t, int st, int nres);

/* The next task of the round run_ready is running, taken off the ready queue; NULL once
 * the round's last one has been taken. */
static task *round_take(void) {
  task *t = ready_head;
  if (!round_stop || !t) return NULL;
  ready_head = t->rnext;
  if (!ready_head) ready_tail = NULL;
  if (t == round_stop) round_stop = NULL;
  return t;
}

/* The next task of the round, if it has no C stack of its own (it is new, or suspended
 * by a Lua yield): the runner that just finished a task runs it straight on, without the
 * two switches through the main context. */
static task *round_next_stackless(void) {
  return ready_head && !ready_head->run ? round_take() : NULL;
}

/* Runs the current task until it ends or suspends, then the next tasks of the round
 * that need no stack of their own; on its runner's stack, for ever. */
static void runner_main(void) {
#ifdef SCHED_ASAN
  __sanitizer_finish_switch_fiber(NULL, &main_stack_bottom, &main_stack_size);
#endif
  for (;;) {
    task *t = current;
    runner *r = t->run;
    lua_State *T = t->T;
    int nres = 0;
    int nargs = t->nargs;
    t->nargs = 0;
    int st;
    if (!t->started && t->cancel) {
      st = LUA_ERRRUN;   /* cancelled before it started: it never runs */
      lua_settop(T, 0);
    } else {
      t->started = 1;
      st = lua_resume(T, NULL, nargs, &nres);
    }
    if (st == LUA_YIELD) {
      lua_pop(T, nres);
      /* a suspend of ours left it waiting; a bare coroutine.yield is a sleep(0) */
      if (t->state == T_RUN) ready_push(t);
    } else {
      task_ended(t, st, nres);
    }
    t->run = NULL;
    task *next = round_next_stackless();
    if (next) {
      next->run = r;
      next->state = T_RUN;
      current = next;
      continue;
    }
    r->next = free_runners;
    free_runners = r;
    nfree_runners++;
    to_main(r);
  }
}

static runner *runner_get(void) {
  runner *r = free_runners;
  if (r) {
    free_runners = r->next;
    nfree_runners--;
    return r;
  }
  r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->stack = stack_get(&r->slab);
  if (!r->stack) {
    free(r);
    return NULL;
  }
  ctx_make(&r->ctx, r->stack, STACK_SIZE, runner_main);
  return r;
}

/* Runs t until it suspends or ends. Returns -1 (errno set) when no runner could be made:
 * t stays ready. */
static int resume(task *t) {
  runner *r = t->run;
  if (!r) {
    r = runner_get();
    if (!r) return -1;
    t->run = r;
  }
  current = t;
  t->state = T_RUN;
#ifdef SCHED_ASAN
  void *fake = NULL;
  __sanitizer_start_switch_fiber(&fake, r->stack, STACK_SIZE);
  ctx_swap(&main_ctx, &r->ctx);
  __sanitizer_finish_switch_fiber(fake, NULL, NULL);
#else
  ctx_swap(&main_ctx, &r->ctx);
#endif
  current = NULL;
  while (nfree_runners > RUNNERS_KEPT) {
    runner *f = free_runners;
    free_runners = f->next;
    nfree_runners--;
    runner_free(f);
  }
  return 0;
}

/* Runs the tasks that are ready now (not those they make ready: the next round does). */
static void run_ready(void) {
  round_stop = ready_tail;
  task *t;
  while ((t = round_take())) {
    if (resume(t) < 0) {
      ready_push(t);   /* no memory for a stack: try again at the next round */
      break;
    }
  }
  round_stop = NULL;
}

/* ---- waiting inside a task ---- */

/* Suspends the current task until one of fds is ready, the futex word (if any) is woken
 * or differs from expect, the deadline passes, or (parked) the end of a task it joins. */
static int task_wait(struct pollfd *fds, int nfds, fwaiter *fw, double deadline, int parked) {
  task *t = current;
  int one_fd = t->one_fd;
  t->one_fd = -1;
  if (t->cancel) {
    t->cancel = 0;
    return W_CANCEL;
  }
  wnode small[8];
  wnode *nodes = small;
  if (nfds > 8) {
    nodes = malloc(sizeof *nodes * (size_t)nfds);
    if (!nodes) {
      errno = ENOMEM;
      return -1;
    }
  }
  t->fds = fds;
  t->nfds = 0;
  t->nodes = nodes;
  t->nready = 0;
  t->parked = parked;
  for (int i = 0; i < nfds; i++) {
    wnode *n = &nodes[i];
    n->one = (fds[i].events & LUAMP_POLL_ONE) != 0;
    n->events = (short)(fds[i].events & ~LUAMP_POLL_ONE);
    fds[i].revents = 0;
    n->t = t;
    n->i = i;
    n->linked = 0;
    watch *w = fds[i].fd >= 0 ? watch_get(fds[i].fd) : NULL;
    if (!w) continue;   /* a negative fd is ignored, as poll does; no memory: times out */
    n->linked = 1;
    n->w = (int)(w - watches);
    n->prev = w->tail;
    n->next = NULL;
    if (w->tail) w->tail->next = n;
    else w->head = n;
    w->tail = n;
    w->events |= n->events;
    if (!n->one) w->nall++;
    else if (fds[i].fd == one_fd) w->failed++;   /* woken for a token it did not get */
  }
  t->nfds = nfds;
  t->fw = fw;
  if (fw) {
    fw->t = t;
    fw->prev = NULL;
    fw->next = fwaiters;
    if (fwaiters) fwaiters->prev = fw;
    fwaiters = fw;
    fw_dirty = 1;
  }
  t->hidx = -1;
  t->deadline = deadline;
  if (deadline >= 0) heap_push(t);
  t->state = T_WAIT;
  if (deadline >= 0 && deadline <= luamp_now() && !nfds && !fw) wake(t, W_TIMEOUT);
  to_main(t->run);
  if (nodes != small) free(nodes);
  t->nodes = NULL;
  if (t->why != W_CANCEL && t->cancel) {   /* cancelled while it was ready to run */
    t->cancel = 0;
    return W_CANCEL;
  }
  return t->why;
}

/* ---- turns: one waiter per process on a shared wait ---- */

/* Tasks of this process that wait for the same thing (a queue class: its getters, say)
 * take turns: the holder of the turn waits the cross-process way (registers in the
 * queue, polls its token fd), the others wait in line here, suspended without system
 * calls. When the holder leaves (it got its item, timed out, was cancelled) the first in
 * line gets the turn and runs at the next round: it finds an item left over, or becomes
 * the one that registers. So one token from another process starts a chain that serves
 * the whole backlog, each step a task switch. */
typedef struct turn {
  const void *key;
  task *holder;
  task *head, *tail;   /* waiting for the turn, in order */
  struct turn *next;
} turn;

static turn *turn_find(const void *key, int make) {
  for (struct turn **p = &turns; *p; p = &(*p)->next) {
    turn *u = *p;
    if (u->key != key) continue;
    if (p != &turns) {   /* move to the front: the busy one is found first */
      *p = u->next;
      u->next = turns;
      turns = u;
    }
    return u;
  }
  if (!make) return NULL;
  turn *u = calloc(1, sizeof *u);
  if (!u) return NULL;
  u->key = key;
  u->next = turns;
  turns = u;
  return u;
}

static void turn_drop_if_idle(turn *u) {
  if (u->holder || u->head) return;
  for (struct turn **p = &turns; *p; p = &(*p)->next)
    if (*p == u) {
      *p = u->next;
      free(u);
      return;
    }
}

static void turn_unline(turn *u, task *t) {
  if (t->tprev) t->tprev->tnext = t->tnext;
  else u->head = t->tnext;
  if (t->tnext) t->tnext->tprev = t->tprev;
  else u->tail = t->tprev;
  t->tprev = t->tnext = NULL;
}

static void turn_line(turn *u, task *t) {
  t->tnext = NULL;
  t->tprev = u->tail;
  if (u->tail) u->tail->tnext = t;
  else u->head = t;
  u->tail = t;
}

/* After a wait for the turn ended for reason why: 1 it has the turn, 0 the deadline
 * passed, -2 cancelled (a turn handed over meanwhile goes on to the next). */
static int turn_waited(task *t, const void *key, int why) {
  turn *u = turn_find(key, 0);
  if (!u) return why == W_CANCEL ? -2 : why == W_TURN;
  if (u->holder == t) {
    if (why == W_TURN) return 1;
    luamp_sched_turn_leave(key);
  } else if (t->tprev || u->head == t) {
    turn_unline(u, t);
    turn_drop_if_idle(u);
  }
  return why == W_CANCEL ? -2 : 0;
}

int luamp_sched_turn_try(const void *key) {
  if (!luamp_sched_in_task()) return 1;
  turn *u = turn_find(key, 1);
  if (!u) return 1;   /* no memory: wait the cross-process way, as outside a task */
  if (u->holder && u->holder != current) return 0;
  u->holder = current;
  return 1;
}

void luamp_sched_turn_leave(const void *key) {
  if (!luamp_sched_in_task()) return;
  turn *u = turn_find(key, 0);
  if (!u || u->holder != current) return;
  u->holder = u->head;
  if (u->head) {
    task *t = u->head;
    turn_unline(u, t);
    wake(t, W_TURN);
  }
  turn_drop_if_idle(u);
}

int luamp_sched_turn_wait(const void *key, double deadline) {
  if (!luamp_sched_in_task()) return 1;
  turn *u = turn_find(key, 1);
  if (!u) return 1;
  task *t = current;
  if (!u->holder || u->holder == t) {
    u->holder = t;
    return 1;
  }
  turn_line(u, t);
  return turn_waited(t, key, task_wait(NULL, 0, NULL, deadline, 0));
}

int luamp_sched_can_yield(lua_State *L) {
  return luamp_sched_in_task() && L == current->T && lua_isyieldable(L);
}

int luamp_sched_turn_yield(lua_State *L, const void *key, double deadline, lua_KFunction k,
                           lua_KContext ctx) {
  task *t = current;
  t->turn_key = key;
  t->deadline = deadline;
  turn *u = turn_find(key, 1);
  if (t->cancel || !u || !u->holder || u->holder == t) {
    /* no need to wait (or no memory to: then it waits the cross-process way) */
    if (u && !u->holder) u->holder = t;
    t->why = t->cancel ? W_CANCEL : W_TURN;
    t->cancel = 0;
    return k(L, LUA_OK, ctx);
  }
  turn_line(u, t);
  t->takes = 1;
  t->nfds = 0;
  t->fw = NULL;
  t->parked = 0;
  t->hidx = -1;
  if (deadline >= 0) heap_push(t);
  t->state = T_WAIT;
  if (deadline >= 0 && deadline <= luamp_now()) wake(t, W_TIMEOUT);
  return lua_yieldk(L, 0, ctx, k);   /* runner_main sees the yield; the runner is free */
}

/* The task given the turn for u and not run yet, if it waits by turn_yield (and so can be
 * handed an item in place of the turn), else NULL. */
static task *taker(turn *u) {
  task *w = u->holder;
  if (!w || w == current || w->state != T_READY || w->why != W_TURN || !w->takes || w->cancel)
    return NULL;
  return w;
}

/* Gives w (taker(u)) the item, and the turn to the first in line. */
static void hand(turn *u, task *w, const char *data, size_t len) {
  memcpy(w->item, data, len);
  w->item_len = len;
  w->why = W_ITEM;
  u->holder = u->head;
  if (u->head) {
    task *h = u->head;
    turn_unline(u, h);
    wake(h, W_TURN);
  }
}

int luamp_sched_turn_handable(const void *key) {
  if (!luamp_sched_active()) return 0;   /* (a forked child forgets its parent's tasks) */
  turn *u = turns && turns->key == key ? turns : turn_find(key, 0);
  return u && taker(u);
}

/* Items handed on per get: the tasks handed them run (in line order) while what the
 * handing touched of them is still in the cache; the task given the turn after them
 * takes the next item and hands on the next batch. */
#define HAND_BATCH 64

int luamp_sched_turn_hand_on(const void *key, int (*next)(void *arg, const char **data, size_t *len),
                             void *arg) {
  turn *u = luamp_sched_active() ? turn_find(key, 0) : NULL;
  if (!u) return 0;
  int n = 0;
  task *w;
  const char *data;
  size_t len;
  while (n < HAND_BATCH && (w = taker(u)) && next(arg, &data, &len)) {
    hand(u, w, data, len);
    n++;
  }
  turn_drop_if_idle(u);
  return n;
}

int luamp_sched_turn_resumed(double *deadline, const char **item, size_t *len) {
  task *t = current;
  *deadline = t->deadline;
  t->takes = 0;
  int why = t->why;
  if (why == W_ITEM) {
    /* cancelled after it was handed its item: the item goes to the next taker, if there
     * is one (then this wait raises Interrupted); else it is this wait's result, and the
     * cancel is for the next wait */
    turn *u = t->cancel ? turn_find(t->turn_key, 0) : NULL;
    task *w = u ? taker(u) : NULL;
    if (!w) {
      *item = t->item;
      *len = t->item_len;
      return 2;
    }
    hand(u, w, t->item, t->item_len);
    t->cancel = 0;
    return -2;
  }
  if (why != W_CANCEL && t->cancel) {   /* cancelled while it was ready to run */
    t->cancel = 0;
    why = W_CANCEL;
  }
  return turn_waited(t, t->turn_key, why);
}

/* ---- the futex bridge ---- */

static struct {
  int started;              /* 1 running, -1 unavailable (no futex_waitv) */
  pthread_t th;
  pthread_mutex_t mu;
  int efd;
  _Atomic uint32_t gen;
  int n;
  uint64_t addr[BRIDGE_MAX];
  uint32_t val[BRIDGE_MAX];
  uint64_t fired;           /* the word the bridge saw woken (under mu), 0 none */
  int changed;              /* a word differed from its value */
  int overflow;             /* more distinct words than the bridge holds */
} br = {.mu = PTHREAD_MUTEX_INITIALIZER, .efd = -1};

struct sched_waitv { uint64_t val, uaddr; uint32_t flags, reserved; };

static void *bridge_main(void *arg) {
  (void)arg;
  struct sched_waitv v[BRIDGE_MAX + 1];
  for (;;) {
    pthread_mutex_lock(&br.mu);
    uint32_t gen = atomic_load(&br.gen);
    int n = br.n;
    for (int i = 0; i < n; i++)
      v[i] = (struct sched_waitv){.val = br.val[i], .uaddr = br.addr[i], .flags = FUTEX2_SIZE_U32};
    pthread_mutex_unlock(&br.mu);
    v[n] = (struct sched_waitv){.val = gen, .uaddr = (uint64_t)(uintptr_t)&br.gen,
                                .flags = FUTEX2_SIZE_U32 | FUTEX2_PRIVATE};
    long r = syscall(SYS_futex_waitv, v, n + 1, 0, NULL, 0);
    if (r == n || atomic_load(&br.gen) != gen) continue;   /* a new set to wait on */
    if (r < 0 && errno != EAGAIN) continue;
    pthread_mutex_lock(&br.mu);
    if (r >= 0) br.fired = v[r].uaddr;
    else br.changed = 1;
    pthread_mutex_unlock(&br.mu);
    uint64_t one = 1;
    ssize_t w;
    do w = write(br.efd, &one, sizeof one); while (w < 0 && errno == EINTR);
    /* until the main context has looked and published again */
    while (atomic_load(&br.gen) == gen)
      syscall(SYS_futex, &br.gen, FUTEX_WAIT_PRIVATE, gen, NULL, NULL, 0);
  }
  return NULL;
}

static void bridge_forget(void) {
  if (br.efd >= 0) luamp_close_fd(br.efd);
  br.efd = -1;
  if (br.started > 0) br.started = 0;
  pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
  br.mu = fresh;
  br.n = 0;
  br.fired = 0;
  br.changed = 0;
}

static int bridge_start(void) {
  if (br.started) return br.started > 0;
  /* does the kernel have futex_waitv? (an empty vector is EINVAL there, ENOSYS without) */
  if (syscall(SYS_futex_waitv, NULL, 0, 0, NULL, 0) < 0 && errno == ENOSYS) {
    br.started = -1;
    return 0;
  }
  br.efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (br.efd < 0) return 0;
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  pthread_attr_t a;
  pthread_attr_init(&a);
  pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
  pthread_attr_setstacksize(&a, 64 << 10);
  int rc = pthread_create(&br.th, &a, bridge_main, NULL);
  pthread_attr_destroy(&a);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (rc != 0) {
    luamp_close_fd(br.efd);
    br.efd = -1;
    return 0;
  }
  br.started = 1;
  return 1;
}

/* Hands the bridge the current set of futex words. */
static void bridge_publish(void) {
  fw_dirty = 0;
  if (!fwaiters || !bridge_start()) {
    if (br.started > 0 && br.n) {
      pthread_mutex_lock(&br.mu);
      br.n = 0;
      pthread_mutex_unlock(&br.mu);
      atomic_fetch_add(&br.gen, 1);
      syscall(SYS_futex, &br.gen, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
    return;
  }
  pthread_mutex_lock(&br.mu);
  br.n = 0;
  br.overflow = 0;
  for (fwaiter *f = fwaiters; f; f = f->next) {
    uint64_t a = (uint64_t)(uintptr_t)f->word;
    int k = 0;
    while (k < br.n && br.addr[k] != a) k++;
    if (k < br.n) continue;
    if (br.n == BRIDGE_MAX) {
      br.overflow = 1;
      continue;
    }
    br.addr[br.n] = a;
    br.val[br.n] = f->expect;
    br.n++;
  }
  pthread_mutex_unlock(&br.mu);
  atomic_fetch_add(&br.gen, 1);
  syscall(SYS_futex, &br.gen, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* Wakes the futex waiters the bridge reported, or whose word changed. */
static void bridge_collect(void) {
  uint64_t cnt;
  while (read(br.efd, &cnt, sizeof cnt) < 0 && errno == EINTR) {}
  pthread_mutex_lock(&br.mu);
  uint64_t fired = br.fired;
  br.fired = 0;
  br.changed = 0;
  pthread_mutex_unlock(&br.mu);
  for (fwaiter *f = fwaiters, *next; f; f = next) {
    next = f->next;
    if ((uint64_t)(uintptr_t)f->word == fired || atomic_load(f->word) != f->expect) {
      f->fired = 1;
      if (f->t) wake(f->t, W_FUTEX);
      else fw_unlink(f);
    }
  }
  fw_dirty = 1;   /* the bridge waits for a new set */
}

/* Whether some futex waiters have no bridge watching for them: then the main context
 * looks at their words itself every FUTEX_FALLBACK seconds. */
static int futex_unbridged(void) { return br.started < 0 || br.overflow; }

static void check_unbridged(void) {
  if (!fwaiters || !futex_unbridged()) return;
  for (fwaiter *f = fwaiters, *next; f; f = next) {
    next = f->next;
    if (atomic_load(f->word) != f->expect) {
      f->fired = 1;
      if (f->t) wake(f->t, W_FUTEX);
      else fw_unlink(f);
    }
  }
}

/* ---- the main context's wait ---- */

static int remaining_ms(double deadline) {
  int slice = (int)(LUAMP_WAIT_SLICE * 1000);
  if (deadline < 0) return slice;
  double left = deadline - luamp_now();
  if (left <= 0) return 0;
  double ms = ceil(left * 1000.0);
  return ms > slice ? slice : (int)ms;
}

#define POLL_EVERY 32
static int rounds_unpolled;

/* Waits for the caller's fds, its futex waiter fw, the deadline or (stop_ended 1) a task's
 * end or (2) the end of every task, running tasks meanwhile. Returns as luamp_wait_fds does (fw: 0 woken, 1 at the
 * deadline). */
static int main_wait(struct pollfd *fds, int nfds, fwaiter *fw, double deadline, int stop_ended) {
  unsigned ended0 = ended;
  if (fw) {
    fw->t = NULL;
    fw->fired = 0;
    fw->prev = NULL;
    fw->next = fwaiters;
    if (fwaiters) fwaiters->prev = fw;
    fwaiters = fw;
    fw_dirty = 1;
  }
  int result;
  for (;;) {
    if (luamp_interrupt_pending()) { result = -2; break; }
    if (!luamp_pump_running()) run_ready();
    check_private_loop();
    if (luamp_interrupt_pending()) { result = -2; break; }
    if (fw && (fw->fired || atomic_load(fw->word) != fw->expect)) { result = 0; break; }
    if (stop_ended == 1 && ended != ended0) { result = 0; break; }
    if (stop_ended == 2 && !live) { result = 0; break; }
    if (deadline >= 0 && luamp_now() >= deadline) { result = fw ? 1 : 0; break; }
    /* Tasks made ready by tasks (a turn or an item handed on, a sleep(0)) run on without
     * a poll for up to POLL_EVERY rounds: a chain of handovers costs no system call, and
     * fds (the caller's too) are still looked at every POLL_EVERY rounds. */
    if (ready_head && !luamp_pump_running() && ++rounds_unpolled < POLL_EVERY) {
      expire_deadlines(luamp_now());
      continue;
    }
    rounds_unpolled = 0;
    int ms = remaining_ms(deadline);
    if (ready_head && !luamp_pump_running()) ms = 0;
    if (nheap > 0) {
      int t = remaining_ms(heap[0]->deadline);
      if (t < ms) ms = t;
    }
    if (fw_dirty) bridge_publish();
    if (fwaiters && futex_unbridged() && ms > (int)(FUTEX_FALLBACK * 1000))
      ms = (int)(FUTEX_FALLBACK * 1000);
    watches_compact();
    int cap = nfds + luamp_pump_count() + nwatches + 1;
    struct pollfd stackfds[64];
    struct pollfd *all = cap <= 64 ? stackfds : malloc(sizeof *all * (size_t)cap);
    if (!all) { errno = ENOMEM; result = -1; break; }
    if (nfds) memcpy(all, fds, sizeof *all * (size_t)nfds);
    for (int i = 0; i < nfds; i++) all[i].events &= (short)~LUAMP_POLL_ONE;
    int n = luamp_pump_fill(all, nfds);
    int wbase = n;
    int nw = nwatches;
    for (int i = 0; i < nw; i++) {
      all[n].fd = watches[i].fd;
      all[n].events = watches[i].events;
      all[n].revents = 0;
      n++;
    }
    int bidx = -1;
    if (br.started > 0 && br.efd >= 0) {
      bidx = n;
      all[n].fd = br.efd;
      all[n].events = POLLIN;
      all[n].revents = 0;
      n++;
    }
    int r = poll(all, (nfds_t)n, ms);
    int err = errno;
    int mine = 0;
    if (r > 0) {
      for (int i = 0; i < nfds; i++) {
        fds[i].revents = all[i].revents;
        if (fds[i].revents) mine++;
      }
      for (int i = 0; i < nw; i++)
        if (all[wbase + i].revents) watch_ready(i, all[wbase + i].revents);
      if (bidx >= 0 && all[bidx].revents) bridge_collect();
    }
    check_unbridged();
    expire_deadlines(luamp_now());
    /* last: a pump may wait itself, and run this function nested */
    if (r > 0) luamp_pump_dispatch(all, nfds, wbase);
    if (all != stackfds) free(all);
    /* a pump that met a Ctrl-C handed it on: it wins over the caller's readiness */
    if (luamp_interrupt_pending()) { result = -2; break; }
    if (r < 0 && err != EINTR) { errno = err; result = -1; break; }
    if (mine) { result = mine; break; }
  }
  if (fw && (fw->prev || fwaiters == fw)) fw_unlink(fw);
  host_sync();
  return result;
}

/* ---- entry points from wait.c and sync.c ---- */

static int sched_wait_fds(struct pollfd *fds, int nfds, double deadline) {
  if (!luamp_sched_in_task()) return main_wait(fds, nfds, NULL, deadline, 0);
  int why = task_wait(fds, nfds, NULL, deadline, 0);
  if (why < 0) return -1;
  if (why == W_CANCEL) return -2;
  if (why == W_FD) {
    int k = 0;
    for (int i = 0; i < nfds; i++)
      if (fds[i].revents) k++;
    return k;
  }
  return 0;
}

int luamp_sched_futex_wait(_Atomic uint32_t *word, uint32_t expect, double deadline) {
  if (atomic_load(word) != expect) return 0;
  fwaiter fw = {.word = word, .expect = expect};
  if (!luamp_sched_in_task()) return main_wait(NULL, 0, &fw, deadline, 0);
  int why = task_wait(NULL, 0, &fw, deadline, 0);
  if (why == W_CANCEL) return -2;
  return why == W_TIMEOUT ? 1 : 0;
}

/* ---- the host's loop ---- */

static uv_timer_t *htimer;
static uv_idle_t *hidle;
static uv_poll_t *hbridge;

static void host_close_cb(uv_handle_t *h) { free(h); }

static void host_after(void) {
  if (!luamp_pump_running()) run_ready();
  check_private_loop();
  if (luamp_interrupt_pending() && live) {
    /* nobody calls run() to see it: cancel every task, as run() would */
    luamp_take_interrupt();
    for (int i = 0; i < slots_top; i++)
      if (slots[i]) cancel_task(slots[i]);
  }
  host_sync();
}

static void on_host_poll(uv_poll_t *h, int status, int events) {
  int fd = (int)(intptr_t)h->data;
  luamp_pump_run_if_ready(fd);
  if (fd < watch_of_fd_cap && watch_of_fd[fd]) {
    short re = 0;
    if (events & UV_READABLE) re |= POLLIN;
    if (events & UV_WRITABLE) re |= POLLOUT;
    if (events & UV_DISCONNECT) re |= POLLHUP;
    if (status < 0) re |= POLLERR;
    watch_ready(watch_of_fd[fd] - 1, re);
  }
  expire_deadlines(luamp_now());
  host_after();
}

static void on_host_timer(uv_timer_t *h) {
  (void)h;
  check_unbridged();
  expire_deadlines(luamp_now());
  host_after();
}

static void on_host_idle(uv_idle_t *h) {
  (void)h;
  expire_deadlines(luamp_now());
  host_after();
}

static void on_host_bridge(uv_poll_t *h, int status, int events) {
  (void)h;
  (void)status;
  (void)events;
  bridge_collect();
  host_after();
}

static void host_watch_close(watch *w) {
  if (!w->host) return;
  uv_close((uv_handle_t *)w->host, host_close_cb);
  w->host = NULL;
}

static uv_loop_t *hloop;   /* the host's loop, as host_ours last found it */

static int host_ours(void) {
  if (current) return 0;
  hloop = luamp_host_loop();
  return hloop != NULL;
}

static void host_sync(void) {
  if (!host_ours()) return;
  forget_if_forked();
  watches_compact();
  for (int i = 0; i < nwatches; i++) {
    watch *w = &watches[i];
    int ev = (w->events & POLLIN ? UV_READABLE : 0) | (w->events & POLLOUT ? UV_WRITABLE : 0);
    if (w->host && w->host_events == ev) continue;
    if (!w->host) {
      uv_poll_t *p = malloc(sizeof *p);
      if (!p) continue;
      /* EEXIST: the fd is a pump's, watched by loop.c, whose callback wakes us too */
      if (uv_poll_init(hloop, p, w->fd) < 0) { free(p); continue; }
      p->data = (void *)(intptr_t)w->fd;
      w->host = p;
    }
    w->host_events = (short)ev;
    uv_poll_start(w->host, ev, on_host_poll);
  }
  if (fw_dirty) bridge_publish();
  if (br.started > 0 && br.efd >= 0 && !hbridge && fwaiters) {
    hbridge = malloc(sizeof *hbridge);
    if (hbridge && uv_poll_init(hloop, hbridge, br.efd) == 0) {
      uv_poll_start(hbridge, UV_READABLE, on_host_bridge);
    } else {
      free(hbridge);
      hbridge = NULL;
    }
  }
  if (!htimer) {
    htimer = malloc(sizeof *htimer);
    if (htimer) uv_timer_init(hloop, htimer);
  }
  if (htimer) {
    double next = nheap > 0 ? heap[0]->deadline : -1;
    if (fwaiters && futex_unbridged()) {
      double tick = luamp_now() + FUTEX_FALLBACK;
      if (next < 0 || tick < next) next = tick;
    }
    if (next >= 0) {
      double ms = ceil((next - luamp_now()) * 1000.0);
      uv_timer_start(htimer, on_host_timer, ms < 0 ? 0 : (uint64_t)ms, 0);
    } else {
      uv_timer_stop(htimer);
    }
  }
  if (!hidle) {
    hidle = malloc(sizeof *hidle);
    if (hidle) uv_idle_init(hloop, hidle);
  }
  if (hidle) {
    if (ready_head) uv_idle_start(hidle, on_host_idle);
    else uv_idle_stop(hidle);
  }
  if (!live) {
    /* nothing left: let the host's loop end */
    if (htimer) { uv_close((uv_handle_t *)htimer, host_close_cb); htimer = NULL; }
    if (hidle) { uv_close((uv_handle_t *)hidle, host_close_cb); hidle = NULL; }
    if (hbridge) { uv_close((uv_handle_t *)hbridge, host_close_cb); hbridge = NULL; }
  }
}

static void host_fd_ready(int fd) {
  if (!host_ours() || fd >= watch_of_fd_cap || !watch_of_fd[fd]) return;
  watch *w = &watches[watch_of_fd[fd] - 1];
  if (w->host) return;   /* its own watch reports it */
  struct pollfd p = {.fd = fd, .events = w->events, .revents = 0};
  if (poll(&p, 1, 0) <= 0) return;
  watch_ready(watch_of_fd[fd] - 1, p.revents);
  host_after();
}

/* ---- Lua binding ---------------------------------------------------------------------- */

static void raise_cancelled(lua_State *L) {
  luamp_raise(L, "Interrupted", "task cancelled");
}

#define TASK_MT "luamp.Task"

/* A free slot (slots[] and the anchor table), or -1 with no memory. */
static int slot_get(void) {
  if (nfree_slots) return free_slots[--nfree_slots];
  if (slots_top == slots_cap) {
    int cap = slots_cap ? slots_cap * 2 : 256;
    task **s = realloc(slots, sizeof *s * (size_t)cap);
    if (!s) return -1;
    slots = s;
    int *f = realloc(free_slots, sizeof *f * (size_t)cap);
    if (!f) return -1;
    free_slots = f;
    slots_cap = cap;
  }
  return slots_top++;
}

/* Records the failure of t (its thread T dead with the error on top), on the helper
 * thread in lua_pcall: the traceback, T's pending to-be-closed variables closed, then T
 * holds [error, traceback]. An Interrupted ends it as cancelled (and a Ctrl-C that struck
 * its Lua code is handed to the main context); any other error joins the failed list
 * that run() raises from. */
static int record_failure(lua_State *H) {
  task *t = lua_touserdata(H, 1);
  lua_State *T = t->T;
  luaL_traceback(H, T, "", 0);   /* 2: from where it raised, down to the task function */
  /* the error object (or the error of a __close handler) is left at T's index 1 */
  if (lua_resetthread(T) == LUA_OK) lua_pushnil(T);
  lua_settop(T, 1);
  lua_pushvalue(T, 1);
  lua_xmove(T, H, 1);   /* 3: the error */
  if (luamp_is_interrupted(H, 3)) {
    if (!t->cancelled) luamp_request_interrupt();
    t->result = E_CANCELLED;
  } else {
    t->result = E_ERROR;
    lua_rawgetp(H, LUA_REGISTRYINDEX, &failed_key);
    lua_rawgeti(anchors, 1, t->slot + 1);
    lua_xmove(anchors, H, 1);
    lua_rawseti(H, -2, (lua_Integer)lua_rawlen(H, -2) + 1);
  }
  lua_settop(H, 2);
  lua_xmove(H, T, 1);
  return 0;
}

/* The end of task t (st: what lua_resume returned; LUA_ERRRUN with an empty stack for a
 * task cancelled before it started). Its results stay on T for Task:wait; it leaves the
 * slots and the anchor table, after which the Task userdata (t's memory) lives as long
 * as Lua keeps it. Tasks in Task:wait for it are woken. */
static void task_ended(task *t, int st, int nres) {
  lua_State *T = t->T;
  t->state = T_DONE;
  live--;
  ended++;
  if (st == LUA_OK) {
    t->result = E_OK;
    t->nres = nres;
  } else if (lua_gettop(T) == 0) {
    t->result = E_CANCELLED;
  } else {
    t->result = E_ERROR;
    lua_settop(helper, 0);
    lua_pushcfunction(helper, record_failure);
    lua_pushlightuserdata(helper, t);
    if (lua_pcall(helper, 1, 0, 0) != LUA_OK) {   /* no memory for the record */
      fprintf(stderr, "luamp: task %lld failed: %s\n", (long long)t->id, luamp_push_error_text(helper, -1));
      lua_settop(helper, 0);
      lua_settop(T, 0);
      t->result = E_CANCELLED;
    }
  }
  for (task *j = t->joiners; j; j = j->jnext)
    if (j->state == T_WAIT && j->parked) wake(j, W_UNPARK);
  t->joiners = NULL;
  slots[t->slot] = NULL;
  free_slots[nfree_slots++] = t->slot;
  /* nothing allocated: the slot exists in the table, and setting nil never grows it */
  lua_pushnil(anchors);
  lua_rawseti(anchors, 1, t->slot + 1);
}

static task *check_task(lua_State *L, int idx) {
  return luaL_checkudata(L, idx, TASK_MT);
}

/* task_new(fn, ...) -> Task: a task that will call fn(...) on a thread of its own. */
static int l_task_new(lua_State *L) {
  luaL_checkany(L, 1);
  forget_if_forked();
  int n = lua_gettop(L);
  if (!lua_checkstack(L, n + 4)) luamp_raise(L, "Value", "task: too many arguments");
  int slot = slot_get();
  if (slot < 0) luamp_raise(L, "Value", "task: out of memory");
  lua_pushvalue(anchors, 1);   /* (a table that grows raises here, on the caller) */
  lua_xmove(anchors, L, 1);
  task *t = lua_newuserdatauv(L, sizeof *t, 1);
  memset(t, 0, sizeof *t);
  luaL_setmetatable(L, TASK_MT);
  lua_pushvalue(L, -1);
  lua_rawseti(L, -3, slot + 1);
  lua_remove(L, -2);
  /* no C stack yet: a runner's is lent to it whenever it runs */
  lua_State *T = lua_newthread(L);
  lua_setiuservalue(L, -2, 1);
  for (int i = 1; i <= n; i++) lua_pushvalue(L, i);
  lua_xmove(L, T, n);
  t->T = T;
  t->nargs = n - 1;
  t->id = ++next_id;
  t->slot = slot;
  t->hidx = -1;
  t->one_fd = -1;
  slots[slot] = t;
  live++;
  ready_push(t);
  host_sync();
  return 1;
}

/* task_metatable() -> the Tasks' metatable (scheduler.lua fills it) */
static int l_task_metatable(lua_State *L) {
  luaL_getmetatable(L, TASK_MT);
  return 1;
}

/* task_in() -> whether a task runs now */
static int l_task_in(lua_State *L) {
  lua_pushboolean(L, luamp_sched_in_task());
  return 1;
}

/* task_id(t) -> its number */
static int l_task_id(lua_State *L) {
  lua_pushinteger(L, check_task(L, 1)->id);
  return 1;
}

/* task_state(t) -> "running", "done", "failed" or "cancelled" */
static int l_task_state(lua_State *L) {
  static const char *const names[] = {"running", "done", "failed", "cancelled"};
  lua_pushstring(L, names[check_task(L, 1)->result]);
  return 1;
}

/* task_done(t, [claim]) -> whether it ended. claim: its error counts as seen from now on. */
static int l_task_done(lua_State *L) {
  task *t = check_task(L, 1);
  if (lua_toboolean(L, 2)) t->waited = 1;
  lua_pushboolean(L, t->result != E_RUNNING);
  return 1;
}

/* task_claim(t) -> true if nobody had seen its end (and now somebody has) */
static int l_task_claim(lua_State *L) {
  task *t = check_task(L, 1);
  lua_pushboolean(L, !t->waited);
  t->waited = 1;
  return 1;
}

/* task_results(t) -> true, its results | false, error (nil: cancelled before it ran),
 * traceback. It must have ended. */
static int l_task_results(lua_State *L) {
  task *t = check_task(L, 1);
  if (t->result == E_RUNNING) luamp_raise(L, "Value", "task_results: the task runs");
  lua_State *T = t->T;
  if (t->result == E_OK) {
    if (!lua_checkstack(L, t->nres + 1)) luamp_raise(L, "Value", "task: too many results");
    lua_pushboolean(L, 1);
    int base = lua_gettop(T) - t->nres;
    for (int i = 1; i <= t->nres; i++) lua_pushvalue(T, base + i);
    lua_xmove(T, L, t->nres);
    return t->nres + 1;
  }
  lua_pushboolean(L, 0);
  if (lua_gettop(T) < 2) {
    lua_pushnil(L);
    lua_pushliteral(L, "");
    return 3;
  }
  lua_pushvalue(T, 1);
  lua_pushvalue(T, 2);
  lua_xmove(T, L, 2);
  return 3;
}

/* task_unseen(t) -> error, traceback of a failed task nobody waited for, or nothing */
static int l_task_unseen(lua_State *L) {
  task *t = check_task(L, 1);
  if (t->result != E_ERROR || t->waited || lua_gettop(t->T) < 2) return 0;
  lua_pushvalue(t->T, 1);
  lua_pushvalue(t->T, 2);
  lua_xmove(t->T, L, 2);
  return 2;
}

/* task_take_failed() -> the tasks that raised since the last call, in order */
static int l_task_take_failed(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &failed_key);
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &failed_key);
  return 1;
}

static void cancel_task(task *t) {
  t->cancelled = 1;
  if (t->state == T_WAIT) wake(t, W_CANCEL);
  else t->cancel = 1;
}

/* task_cancel(t) -> true if the task had not ended */
static int l_task_cancel(lua_State *L) {
  task *t = check_task(L, 1);
  forget_if_forked();
  if (t->state == T_DONE || t->result != E_RUNNING) {
    lua_pushboolean(L, 0);
    return 1;
  }
  cancel_task(t);
  host_sync();
  lua_pushboolean(L, 1);
  return 1;
}

/* task_cancel_all(): cancels every task not ended */
static int l_task_cancel_all(lua_State *L) {
  (void)L;
  forget_if_forked();
  for (int i = 0; i < slots_top; i++)
    if (slots[i]) cancel_task(slots[i]);
  host_sync();
  return 0;
}

/* task_join(t, [timeout]) -> whether t ended; inside a task, which waits suspended. */
static int l_task_join(lua_State *L) {
  task *t = check_task(L, 1);
  double deadline = luamp_deadline_arg(L, 2);
  if (!luamp_sched_in_task()) luamp_raise(L, "Value", "task_join outside a task");
  task *me = current;
  if (t == me) luamp_raise(L, "Value", "Task:wait: a task cannot wait for itself");
  int why = W_UNPARK;
  while (t->result == E_RUNNING && why != W_CANCEL && why != W_TIMEOUT) {
    me->jnext = t->joiners;
    t->joiners = me;
    why = task_wait(NULL, 0, NULL, deadline, 1);
    for (task **p = &t->joiners; *p; p = &(*p)->jnext)
      if (*p == me) {
        *p = me->jnext;
        break;
      }
    if (why < 0) luamp_raise_errno(L, "Value", "Task:wait", errno);
  }
  if (why == W_CANCEL) raise_cancelled(L);
  lua_pushboolean(L, t->result != E_RUNNING);
  return 1;
}

/* task_count() -> tasks not finished */
static int l_task_count(lua_State *L) {
  forget_if_forked();
  lua_pushinteger(L, live);
  return 1;
}

/* sched_step([timeout], [all]): runs tasks until one ends (all: until none is left), the
 * timeout passes or (with no task left) at once. Raises Interrupted on Ctrl-C. Main
 * context only. */
static int l_sched_step(lua_State *L) {
  double deadline = luamp_deadline_arg(L, 1);
  int all = lua_toboolean(L, 2);
  if (luamp_sched_in_task()) luamp_raise(L, "Value", "sched_step inside a task");
  forget_if_forked();
  if (!live) return 0;
  int rc = main_wait(NULL, 0, NULL, deadline, all ? 2 : 1);
  if (rc == -2) {
    luamp_take_interrupt();
    luamp_raise(L, "Interrupted", "interrupted");
  }
  if (rc < 0) luamp_raise_errno(L, "Value", "wait", errno);
  return 0;
}

/* sched_interrupt(): marks a Ctrl-C for the main context (a task met one in Lua code). */
static int l_sched_interrupt(lua_State *L) {
  (void)L;
  luamp_request_interrupt();
  return 0;
}

/* When the state closes, its tasks go (they can never run again). Their stacks are
 * unmapped; whatever their suspended C frames held is not recovered. */
static int sched_guard_gc(lua_State *L) {
  (void)L;
  if (sched_pid != luamp_self_pid() || current) return 0;
  /* the tasks' memory is their Task userdata, freed by Lua after this */
  for (int i = 0; i < slots_top; i++)
    if (slots[i] && slots[i]->state == T_WAIT) wake(slots[i], W_CANCEL);
  for (int i = 0; i < slots_top; i++) {
    task *t = slots[i];
    if (t && t->run) runner_free(t->run);
    if (t) t->run = NULL;
    slots[i] = NULL;
  }
  slots_top = nfree_slots = 0;
  live = 0;
  ready_head = ready_tail = NULL;
  while (turns) {
    struct turn *u = turns;
    turns = u->next;
    free(u);
  }
  while (free_runners) {
    runner *r = free_runners;
    free_runners = r->next;
    runner_free(r);
  }
  nfree_runners = 0;
  watches_compact();
  host_sync();
  if (htimer) { uv_close((uv_handle_t *)htimer, host_close_cb); htimer = NULL; }
  if (hidle) { uv_close((uv_handle_t *)hidle, host_close_cb); hidle = NULL; }
  if (hbridge) { uv_close((uv_handle_t *)hbridge, host_close_cb); hbridge = NULL; }
  return 0;
}

static const luamp_wait_scheduler wait_hooks = {
  luamp_sched_active, luamp_sched_in_task, sched_wait_fds, host_fd_ready
};

int luamp_open_sched(lua_State *L) {
  luamp_wait_sched = &wait_hooks;
  luamp_on_close(L, "luamp.sched_guard", sched_guard_gc);
  luaL_newmetatable(L, TASK_MT);
  lua_pop(L, 1);
  anchors = lua_newthread(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &anchors);
  lua_newtable(anchors);
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &failed_key);
  helper = lua_newthread(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &helper);
  static const luaL_Reg fns[] = {
    {"task_new", l_task_new},
    {"task_metatable", l_task_metatable},
    {"task_in", l_task_in},
    {"task_id", l_task_id},
    {"task_state", l_task_state},
    {"task_done", l_task_done},
    {"task_claim", l_task_claim},
    {"task_results", l_task_results},
    {"task_unseen", l_task_unseen},
    {"task_take_failed", l_task_take_failed},
    {"task_cancel", l_task_cancel},
    {"task_cancel_all", l_task_cancel_all},
    {"task_join", l_task_join},
    {"task_count", l_task_count},
    {"sched_step", l_sched_step},
    {"sched_interrupt", l_sched_interrupt},
    {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return 0;
}
