/*
 * sync.c — Lock, RLock, Semaphore, BoundedSemaphore, Event, and the cores of Condition
 * and Barrier (whose public objects are built in lua/luamp/sync.lua).
 *
 * Every object is a few words in the shared arena (arena.c), so it works the same in
 * every process that has a handle on it: inherited through fork, or rebuilt from a
 * handle payload that crossed the codec. All waiting is on futexes in those words; the
 * one function that waits on a futex is luamp_futex_wait().
 *
 * Locks: the futex word holds the owner's pid (0 when free) and a WAITERS bit. Acquire
 * is one compare-and-swap in the uncontended case and release one exchange; only when
 * WAITERS is set does release make a syscall. A waiter first spins politely (lock_spin):
 * it looks at the word only every SPIN_POLL and takes the lock only once it stayed free
 * from one look to the next with no release in between (a release count beside the
 * word tells), so a holder that loops over short critical sections keeps the lock and
 * its data in its own cache instead of passing both across on every turn. A waiter that
 * sees the holder release again and again without getting a chance (a loop of short
 * critical sections) naps instead (lock_nap), looking once after each nap, so that the
 * holder runs on undisturbed and makes no futex calls; after
 * SPIN_MAX (or SPIN_STILL of a holder doing nothing) it sleeps on the futex, and a woken
 * waiter that finds the lock taken again spins once more before it sleeps (rather than
 * have the holder wake it on its next release). Sleepers are counted beside the word, so that a waiter that takes the lock
 * sets WAITERS again only when others still sleep (otherwise every release after a
 * contended acquire made a futex call that woke nobody).
 * Storing the pid lets a waiter notice that the holder died: after a millisecond of
 * waiting, and then every OWNER_CHECK seconds, it looks at the owner (a pid that no
 * longer exists, or whose pidfd is readable, i.e. a zombie), and then takes the lock
 * over; the handle that did so reports `recovered`. A pid reused by an
 * unrelated process before the check looks alive, so recovery then waits for that one.
 * An RLock's owner is the process (not a thread or coroutine); its depth lives in the
 * shared word beside it and only the owner touches it.
 *
 * Semaphore: a counter and a count of sleepers, so release only wakes when someone
 * sleeps. Event: a flag and a count of sleepers. Condition: a sequence word to sleep on
 * plus (waiters, wake tokens) in one 64-bit word, so notify(n) wakes exactly n waiters and
 * a waiter that times out while being notified takes its token (wait returns true).
 * Barrier: an internal lock guarding (count, generation, broken); waiters sleep on the
 * generation word, and a bit per recent generation records whether it ended broken.
 *
 * The userdata of each type starts with a magic number, which lets the hot methods
 * check their argument with one comparison instead of a metatable lookup.
 *
 * A Lock or RLock that users hold is a table, not the userdata: its own fields `acquire`
 * and `release` are closures over the userdata, so `lock:acquire()` finds its C function
 * in the table itself (a method of a userdata costs a metatable lookup and a second table
 * lookup on every call), and they check self by identity (the userdata keeps the table's
 * address). Anything else (a wrong self, arguments, a lock that is taken) goes to the
 * general methods in the metatable's __index, which work on any Lock table: wrong-self
 * errors, waits and their tracing (trace.lua wraps those) stay in one place. The table
 * also holds its userdata under a private light-userdata key, for the general methods,
 * and `recovered` once an acquire took the lock over from a dead owner.
 */
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

/* ---- futex waits ---------------------------------------------------------------------- */

int luamp_futex_wait(_Atomic uint32_t *word, uint32_t expect, double deadline) {
  if (luamp_sched_active()) return luamp_sched_futex_wait(word, expect, deadline);
  for (;;) {
    if (luamp_interrupt_pending()) return -2;
    double now = luamp_now();
    if (deadline >= 0 && now >= deadline) return 1;
    /* Always pass a timeout (a slice when waiting forever): a futex wait with a timeout
     * returns EINTR whenever a signal handler ran, even with SA_RESTART, which is how a
     * pending interrupt is noticed. FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC
     * time, so retrying after EINTR keeps the original deadline. */
    /* ...and never longer than LUAMP_WAIT_SLICE: a Ctrl-C whose handler ran between the
     * look at the mark above and the futex call interrupts no system call, and would
     * otherwise wait for the next slice end unseen. */
    double until = now + LUAMP_WAIT_SLICE;
    if (deadline >= 0 && deadline < until) until = deadline;
    struct timespec ts;
    ts.tv_sec = (time_t)until;
    ts.tv_nsec = (long)((until - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
    long r = syscall(SYS_futex, word, FUTEX_WAIT_BITSET, expect, &ts, NULL, FUTEX_BITSET_MATCH_ANY);
    if (r == 0 || errno == EAGAIN) return 0;
    if (errno == ETIMEDOUT) {
      if (deadline >= 0 && luamp_now() >= deadline) return 1;
      continue;
    }
    if (errno != EINTR) return 0;   /* cannot happen for a valid word; callers re-check */
  }
}

void luamp_futex_wake(_Atomic uint32_t *word, int n) {
  syscall(SYS_futex, word, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* ---- shared objects ------------------------------------------------------------------- */

/* Kinds stored in each object's first word, checked when a handle attaches. */
enum { K_LOCK = 0x4c4b4c31, K_RLOCK, K_SEM, K_BSEM, K_EVENT, K_COND, K_BARRIER };

#define WAITERS 0x80000000u
#define OWNER 0x3fffffffu
#define OWNER_CHECK 0.02         /* seconds between looks at a waited-for owner */
#define FIRST_SLICE 0.001
#define SPIN_POLL 2e-6           /* a spinning waiter looks at the word this often... */
#define SPIN_MAX 100e-6          /* ...for this long, before it sleeps in the kernel */
#define SPIN_STILL 20e-6         /* or for this long if the holder neither releases nor leaves */
#define SPIN_BUSY 3              /* looks in a row that saw a release: the holder loops */
#define NAP_FIRST 20e-6          /* a waiter outrun by a looping holder naps this long... */
#define NAP_MAX 200e-6           /* ...twice as long after each nap it was outrun again */

typedef struct lock_obj {
  uint32_t kind;
  _Atomic uint32_t word;          /* owner pid | WAITERS, 0 when free */
  _Atomic uint32_t depth;         /* RLock recursion depth, written by the owner only */
  _Atomic uint32_t sleepers;      /* waiters in (or entering) a futex wait on word */
  _Atomic uint32_t released;      /* bumped by every release, written by the owner only */
} lock_obj;

typedef struct sem_obj {
  uint32_t kind;
  _Atomic uint32_t value;
  _Atomic uint32_t sleepers;
  uint32_t maxvalue;              /* BoundedSemaphore; UINT32_MAX when unbounded */
} sem_obj;

typedef struct event_obj {
  uint32_t kind;
  _Atomic uint32_t flag;
  _Atomic uint32_t sleepers;
} event_obj;

typedef struct cond_obj {
  uint32_t kind;
  _Atomic uint32_t seq;           /* bumped by every notify; waiters sleep on it */
  _Atomic uint64_t ctr;           /* waiters << 32 | wake tokens not yet taken */
} cond_obj;

typedef struct barrier_obj {
  uint32_t kind;
  _Atomic uint32_t gen;           /* generation; waiters sleep on it */
  lock_obj mu;                    /* guards the fields below */
  uint32_t parties;
  _Atomic uint32_t count;         /* arrived in this generation */
  _Atomic uint32_t broken;
  _Atomic uint32_t tripping;      /* the last arrival is running the action */
  uint64_t broken_bits;           /* bit g % 64: generation g ended broken */
  double timeout;                 /* default for wait(); < 0 none */
} barrier_obj;

/* True when pid is gone, or has exited and not been reaped yet. */
static int pid_dead(pid_t pid) {
  if (pid == luamp_self_pid()) return 0;
  if (kill(pid, 0) < 0 && errno == ESRCH) return 1;
  int fd = (int)syscall(SYS_pidfd_open, pid, 0);
  if (fd < 0) return errno == ESRCH;
  struct pollfd p = {.fd = fd, .events = POLLIN};
  int n;
  do n = poll(&p, 1, 0); while (n < 0 && errno == EINTR);
  luamp_close_fd(fd);
  return n > 0;
}

/* Never written: the polite waiter's naps are futex waits on it that only time out. */
static _Atomic uint32_t nap_word;

/* A polite waiter that a holder outran: the holder releases and takes the lock again
 * faster than the waiter can look (a loop of short critical sections in another process).
 * Spinning on would pull the lock's line away from the holder on every look, and sleeping
 * on the word (WAITERS) would make the holder's next release a futex call and hand the
 * lock across, again and again. So the waiter naps on a word nobody wakes, a little longer
 * each time it is outrun again, and looks once after each nap: a free lock it takes, a
 * holder still looping means another nap, and a holder that stopped (no release since the
 * last look: a long critical section, or gone) leaves it to the ordinary sleep on the word,
 * which the release ends. The holder meanwhile runs on at full speed, as a C futex mutex's
 * holder does while its waiter is in the kernel. Returns as lock_spin does. */
static int lock_nap(lock_obj *o, uint32_t me, double deadline, uint32_t seen) {
  double nap = NAP_FIRST;
  for (;;) {
    double now = luamp_now();
    if (deadline >= 0 && now >= deadline) return 0;
    double until = now + nap;
    if (deadline >= 0 && deadline < until) until = deadline;
    /* (a Ctrl-C handled as the nap's system call returned is pending only now) */
    if (luamp_futex_wait(&nap_word, 0, until) == -2 || luamp_interrupt_pending()) return -2;
    uint32_t c = atomic_load_explicit(&o->word, memory_order_relaxed);
    if (c & WAITERS) return 0;
    if (c == 0) {
      uint32_t w = atomic_load_explicit(&o->sleepers, memory_order_relaxed) ? WAITERS : 0;
      if (atomic_compare_exchange_strong_explicit(&o->word, &c, me | w, memory_order_acquire,
                                                  memory_order_relaxed))
        return 1;
      continue;
    }
    uint32_t n = atomic_load_explicit(&o->released, memory_order_relaxed);
    if (n == seen) return 0;
    seen = n;
    nap = nap * 2 < NAP_MAX ? nap * 2 : NAP_MAX;
  }
}

/* Waits for a lock held by another process without sleeping: 1 acquired, 0 when it
 * stops (someone sleeps on the word, SPIN_MAX or the deadline passed, or the holder did
 * nothing for SPIN_STILL: a long critical section, or a holder not running, is not worth
 * a processor), -2 on a pending interrupt. A polite waiter that SPIN_BUSY looks in a row
 * found released again naps instead (lock_nap).
 * A polite waiter (a user's acquire) looks at the word every SPIN_POLL only, reading (a
 * look moves the cache line away from the holder, who then pays a miss), and takes the
 * lock only when it stayed free from one look to the next with no release in between:
 * a holder that releases and acquires again at once (a loop of short critical sections)
 * keeps it and runs on with warm caches, where taking it in that gap moved the lock and
 * the data between the processors on every turn. The internal waits (a Condition taking
 * its lock back, the Barrier's mutex) are for a holder about to leave: they look
 * continuously and take the lock as soon as it is free. */
static int lock_spin(lock_obj *o, uint32_t me, double deadline, int polite) {
  double now = luamp_now(), end = now + SPIN_MAX, active = now;
  if (deadline >= 0 && deadline < end) end = deadline;
  uint32_t last = atomic_load_explicit(&o->word, memory_order_relaxed);
  uint32_t seen = atomic_load_explicit(&o->released, memory_order_relaxed);
  int busy = 0;
  while (now < end && now - active < SPIN_STILL) {
    double next = now + (polite ? SPIN_POLL : 0);
    do {
      luamp_cpu_relax();
      now = luamp_now();
    } while (now < next);
    if (luamp_interrupt_pending()) return -2;
    uint32_t c = atomic_load_explicit(&o->word, memory_order_relaxed);
    if (c & WAITERS) return 0;
    uint32_t n = atomic_load_explicit(&o->released, memory_order_relaxed);
    if (c != last || n != seen) active = now;
    busy = n != seen ? busy + 1 : 0;
    if (polite && busy >= SPIN_BUSY) return lock_nap(o, me, deadline, n);
    if (c == 0 && (!polite || (last == 0 && n == seen))) {
      uint32_t w = atomic_load_explicit(&o->sleepers, memory_order_relaxed) ? WAITERS : 0;
      if (atomic_compare_exchange_strong_explicit(&o->word, &c, me | w, memory_order_acquire,
                                                  memory_order_relaxed))
        return 1;
    }
    last = c;
    seen = n;
  }
  return 0;
}

/* Takes a lock word for `me`: 1 acquired (*recovered set when taken from a dead owner),
 * 0 when the deadline passed, -2 on a pending interrupt. */
static int lock_wait(lock_obj *o, uint32_t me, double deadline, int polite, int *recovered) {
  *recovered = 0;
  /* Looking at the owner costs syscalls, so a blocking acquire first sleeps a short
   * slice (an ordinary holder usually releases within it) and then checks every
   * OWNER_CHECK; a non-blocking one checks at once, and does not spin. */
  int check = deadline >= 0 && deadline <= luamp_now();
  int spin = !check;
  double slice = FIRST_SLICE;
  for (;;) {
    /* A Ctrl-C that came during the acquire is raised by the host's hook when it returns,
     * even after it took the lock: the lock would stay held by a caller told it failed. */
    if (luamp_interrupt_pending()) return -2;
    uint32_t c = atomic_load(&o->word);
    if (c == 0) {
      /* WAITERS again only when others sleep, so that our release wakes one of them
       * and makes no futex call otherwise. A waiter that counts itself after this look
       * sets WAITERS on our word before it sleeps (its futex wait expects that word). */
      uint32_t w = atomic_load(&o->sleepers) ? WAITERS : 0;
      if (atomic_compare_exchange_strong(&o->word, &c, me | w)) return 1;
      continue;
    }
    /* Spinning is for a holder running elsewhere: this process's own (a task, or the
     * code around one) cannot release while we spin. */
    if (spin && (c & OWNER) != me) {
      spin = 0;
      int r = lock_spin(o, me, deadline, polite);
      if (r != 0) return r;
      continue;
    }
    if (check) {
      check = 0;
      if (pid_dead((pid_t)(c & OWNER))) {
        if (atomic_compare_exchange_strong(&o->word, &c, me | WAITERS)) {
          *recovered = 1;
          return 1;
        }
        continue;
      }
    }
    /* the deadline before WAITERS: a waiter that will not sleep must not leave the
     * holder's release a futex call that wakes nobody (acquire(false) did, every time) */
    double now = luamp_now();
    if (deadline >= 0 && now >= deadline) return 0;
    if (!(c & WAITERS)) {
      if (!atomic_compare_exchange_strong(&o->word, &c, c | WAITERS)) continue;
      c |= WAITERS;
    }
    double until = now + slice;
    if (deadline >= 0 && deadline < until) until = deadline;
    /* a waiter killed in its sleep leaves the count high: releases then wake for
     * nothing, as they did before the count existed, and nothing is lost */
    atomic_fetch_add(&o->sleepers, 1);
    int r = luamp_futex_wait(&o->word, c, until);
    atomic_fetch_sub(&o->sleepers, 1);
    if (r == -2) return -2;
    if (r == 1) {
      check = 1;
      slice = OWNER_CHECK;
    } else {
      /* woken: the lock was released, but a holder running a loop has it again by
       * now, so wait as a newcomer does rather than wake it on its next release */
      spin = 1;
    }
  }
}

/* Every release: the count first (a spinning waiter reads it after seeing the word
 * free), then the word. Only the holder writes the count, so no atomic add is needed. */
static inline uint32_t lock_release_word(lock_obj *o) {
  atomic_store_explicit(&o->released, atomic_load_explicit(&o->released, memory_order_relaxed) + 1,
                        memory_order_relaxed);
  return atomic_exchange_explicit(&o->word, 0, memory_order_release);
}

static void lock_unlock(lock_obj *o) {
  if (lock_release_word(o) & WAITERS) luamp_futex_wake(&o->word, 1);
}

/* Internal locks (the Barrier's) are held only for a few instructions; they wait for
 * ever but still take over from a dead holder. */
static void mutex_lock(lock_obj *o) {
  int rec;
  uint32_t c = 0;
  if (atomic_compare_exchange_strong(&o->word, &c, luamp_self_pid())) return;
  int interrupted = 0;
  while (lock_wait(o, luamp_self_pid(), -1, 0, &rec) == -2) interrupted |= luamp_take_interrupt();
  if (interrupted) luamp_request_interrupt();
}

/* ---- userdata ------------------------------------------------------------------------- */

typedef struct sync_type {
  const char *name;               /* public name: "Lock" */
  const char *mt;                 /* registry name of its metatable (a Lock's: the table's) */
  const char *udmt;               /* registry name of the userdata's metatable */
  uint64_t magic;
  unsigned objtype;               /* LUAMP_OBJ_* block type */
  uint32_t kind;
  size_t size;
} sync_type;

enum { T_LOCK, T_RLOCK, T_SEM, T_BSEM, T_EVENT, T_COND, T_BARRIER, T_COUNT };

static const sync_type types[T_COUNT] = {
  {"Lock", "luamp.Lock", "luamp.Lock.core", 0x6b636f4c706d756cULL, LUAMP_OBJ_LOCK, K_LOCK, sizeof(lock_obj)},
  {"RLock", "luamp.RLock", "luamp.RLock.core", 0x6b636f4c52706d75ULL, LUAMP_OBJ_LOCK, K_RLOCK, sizeof(lock_obj)},
  {"Semaphore", "luamp.Semaphore", "luamp.Semaphore", 0x6d65536d756c0001ULL, LUAMP_OBJ_SEMAPHORE, K_SEM, sizeof(sem_obj)},
  {"BoundedSemaphore", "luamp.BoundedSemaphore", "luamp.BoundedSemaphore", 0x6d65536d756c0002ULL, LUAMP_OBJ_SEMAPHORE, K_BSEM, sizeof(sem_obj)},
  {"Event", "luamp.Event", "luamp.Event", 0x746e6576456d756cULL, LUAMP_OBJ_EVENT, K_EVENT, sizeof(event_obj)},
  {"CondCore", "luamp.CondCore", "luamp.CondCore", 0x646e6f436d756c00ULL, LUAMP_OBJ_CONDITION, K_COND, sizeof(cond_obj)},
  {"BarrierCore", "luamp.BarrierCore", "luamp.BarrierCore", 0x7272614270756c00ULL, LUAMP_OBJ_BARRIER, K_BARRIER, sizeof(barrier_obj)},
};

typedef struct sync_ud {
  uint64_t magic;                 /* types[t].magic; lets hot methods skip the metatable */
  void *obj;                      /* == ref.ptr; NULL once closed */
  int t;
  int recovered;                  /* Lock/RLock: its table says recovered = true */
  const void *self;               /* Lock/RLock: the address of its table */
  luamp_ref ref;
} sync_ud;

/* The key under which a Lock's table holds its userdata. */
static const char lock_key = 0;

static int is_lock_type(int t) { return t == T_LOCK || t == T_RLOCK; }

static int type_named(const char *name) {
  for (int t = 0; t < T_COUNT; t++)
    if (strcmp(types[t].name, name) == 0) return t;
  return -1;
}

/* Any of this file's userdata at idx (open or closed), or NULL. */
static sync_ud *any_sync(lua_State *L, int idx) {
  sync_ud *u = lua_touserdata(L, idx);
  if (u && lua_rawlen(L, idx) == sizeof *u && u->t >= 0 && u->t < T_COUNT &&
      u->magic == types[u->t].magic)
    return u;
  return NULL;
}

/* The userdata of the Lock or RLock table at idx (open or closed), or NULL. Only the
 * table the userdata was made for counts: a copy of its fields is not a Lock. */
static sync_ud *lock_of(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TTABLE) return NULL;
  lua_rawgetp(L, idx, &lock_key);
  sync_ud *u = any_sync(L, -1);
  lua_pop(L, 1);
  if (u && is_lock_type(u->t) && u->self == lua_topointer(L, idx)) return u;
  return NULL;
}

/* This file's object at idx: a Lock's table or another type's userdata; NULL if neither. */
static sync_ud *object_at(lua_State *L, int idx) {
  sync_ud *u = lock_of(L, idx);
  if (u) return u;
  u = any_sync(L, idx);
  return u && !is_lock_type(u->t) ? u : NULL;
}

/* The slow half of argument checking: says what was wrong. */
static sync_ud *bad_self(lua_State *L, int idx, int t) {
  sync_ud *u = object_at(L, idx);
  if (u && u->magic == types[t].magic)
    luamp_raise(L, "Value", "%s is closed", types[t].name);
  luamp_raise(L, "Value", "expected a %s, got %s", types[t].name, luaL_typename(L, idx));
}

static inline sync_ud *to_sync(lua_State *L, int idx, int t) {
  sync_ud *u = is_lock_type(t) ? lock_of(L, idx) : any_sync(L, idx);
  if (u && u->magic == types[t].magic && u->obj) return u;
  return bad_self(L, idx, t);
}

/* Lock or RLock at idx. */
static sync_ud *to_any_lock(lua_State *L, int idx) {
  sync_ud *u = lock_of(L, idx);
  if (u && u->obj) return u;
  return bad_self(L, idx, T_LOCK);
}

/* For metamethods, which users can call with anything. */
static sync_ud *checked_any(lua_State *L, int t) {
  sync_ud *u = object_at(L, 1);
  if (!u) bad_self(L, 1, t);
  return u;
}

static sync_ud *to_any_lock_or_closed(lua_State *L) {
  sync_ud *u = lock_of(L, 1);
  if (!u) bad_self(L, 1, T_LOCK);
  return u;
}

static sync_ud *push_ud(lua_State *L, int t) {
  sync_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  u->magic = types[t].magic;
  u->t = t;
  luaL_setmetatable(L, types[t].udmt);
  return u;
}

static int l_lock_acquire_own(lua_State *L);
static int l_lock_release_own(lua_State *L);
static int l_rlock_acquire_own(lua_State *L);
static int l_rlock_release_own(lua_State *L);

/* Replaces the Lock or RLock userdata on the stack top with the table users hold. */
static void wrap_lock(lua_State *L) {
  sync_ud *u = lua_touserdata(L, -1);
  int r = u->t == T_RLOCK;
  lua_createtable(L, 0, 4);                 /* acquire, release, the key, recovered */
  lua_pushvalue(L, -2);
  lua_pushcclosure(L, r ? l_rlock_acquire_own : l_lock_acquire_own, 1);
  lua_setfield(L, -2, "acquire");
  lua_pushvalue(L, -2);
  lua_pushcclosure(L, r ? l_rlock_release_own : l_lock_release_own, 1);
  lua_setfield(L, -2, "release");
  lua_pushvalue(L, -2);
  lua_rawsetp(L, -2, &lock_key);
  luaL_setmetatable(L, types[u->t].mt);
  u->self = lua_topointer(L, -1);
  lua_remove(L, -2);
}

static sync_ud *new_object(lua_State *L, int t) {
  sync_ud *u = push_ud(L, t);
  uint32_t *kind = luamp_ref_alloc(L, &u->ref, types[t].objtype, types[t].size);
  *kind = types[t].kind;
  u->obj = kind;
  if (is_lock_type(t)) wrap_lock(L);
  return u;
}

/* `lock.recovered` is a field of the lock's table (at idx) while true; the methods table
 * says false otherwise. Written on a change only. */
static void set_recovered(lua_State *L, int idx, sync_ud *u, int rec) {
  if (u->recovered == rec) return;
  u->recovered = rec;
  idx = lua_absindex(L, idx);
  lua_pushliteral(L, "recovered");
  if (rec) lua_pushboolean(L, 1);
  else lua_pushnil(L);
  lua_rawset(L, idx);
}

static void sync_release(sync_ud *u) {
  u->obj = NULL;
  luamp_ref_release(&u->ref);
}

static double timeout_deadline(lua_State *L, int block_idx, int timeout_idx) {
  if (!lua_isnoneornil(L, block_idx) && !lua_isboolean(L, block_idx))
    luamp_raise(L, "Value", "block must be a boolean, got %s", luaL_typename(L, block_idx));
  int block = lua_isnoneornil(L, block_idx) || lua_toboolean(L, block_idx);
  double deadline = luamp_deadline_arg(L, timeout_idx);
  return block ? deadline : luamp_now();
}

static int raise_interrupted(lua_State *L, const char *what) {
  luamp_take_interrupt();
  luamp_raise(L, "Interrupted", "interrupted while waiting for %s", what);
}

/* ---- Lock and RLock ------------------------------------------------------------------- */

static int acquire_slow(lua_State *L, sync_ud *u, double deadline) {
  lock_obj *o = u->obj;
  uint32_t me = (uint32_t)luamp_self_pid();
  int rec;
  int r = lock_wait(o, me, deadline, 1, &rec);
  if (r == -2) raise_interrupted(L, types[u->t].name);
  if (r == 1) {
    if (u->t == T_RLOCK) atomic_store_explicit(&o->depth, 1, memory_order_relaxed);
    set_recovered(L, 1, u, rec);
  }
  lua_pushboolean(L, r == 1);
  return 1;
}

/* The general methods, in the metatable's __index: self is checked in full. */

/* lock:acquire([block=true], [timeout]) -> boolean */
static int l_lock_acquire(lua_State *L) {
  sync_ud *u = to_sync(L, 1, T_LOCK);
  lock_obj *o = u->obj;
  if (lua_gettop(L) == 1 && !luamp_interrupt_pending()) {   /* (see lock_wait) */
    uint32_t c = 0;
    if (atomic_compare_exchange_strong_explicit(&o->word, &c, (uint32_t)luamp_self_pid(),
                                                memory_order_acquire, memory_order_relaxed)) {
      set_recovered(L, 1, u, 0);
      lua_pushboolean(L, 1);
      return 1;
    }
  }
  return acquire_slow(L, u, timeout_deadline(L, 2, 3));
}

/* Releases a Lock word: Value when it was not held (any process may release a Lock). */
static void lock_release(lua_State *L, lock_obj *o) {
  uint32_t old = lock_release_word(o);
  if (old & WAITERS) luamp_futex_wake(&o->word, 1);
  else if (old == 0) luamp_raise(L, "Value", "release of an unlocked Lock");
}

/* lock:release() */
static int l_lock_release(lua_State *L) {
  lock_release(L, to_sync(L, 1, T_LOCK)->obj);
  return 0;
}

/* An RLock held by this process at depth d (> 0) one level deeper; 0 at the limit. */
static inline int rlock_deeper(lock_obj *o) {
  uint32_t d = atomic_load_explicit(&o->depth, memory_order_relaxed);
  if (d == UINT32_MAX) return 0;
  atomic_store_explicit(&o->depth, d + 1, memory_order_relaxed);
  return 1;
}

static int l_rlock_acquire(lua_State *L) {
  sync_ud *u = to_sync(L, 1, T_RLOCK);
  lock_obj *o = u->obj;
  uint32_t me = (uint32_t)luamp_self_pid();
  uint32_t c = atomic_load_explicit(&o->word, memory_order_relaxed);
  if ((c & OWNER) == me) {
    if (!rlock_deeper(o)) luamp_raise(L, "Value", "RLock acquired too many times");
    lua_pushboolean(L, 1);
    return 1;
  }
  if (lua_gettop(L) == 1 && !luamp_interrupt_pending()) {   /* (see lock_wait) */
    c = 0;
    if (atomic_compare_exchange_strong_explicit(&o->word, &c, me, memory_order_acquire,
                                                memory_order_relaxed)) {
      atomic_store_explicit(&o->depth, 1, memory_order_relaxed);
      set_recovered(L, 1, u, 0);
      lua_pushboolean(L, 1);
      return 1;
    }
  }
  return acquire_slow(L, u, timeout_deadline(L, 2, 3));
}

/* Releases an RLock this process holds (the caller checked). */
static inline void rlock_release(lock_obj *o) {
  uint32_t d = atomic_load_explicit(&o->depth, memory_order_relaxed);
  if (d > 1) {
    atomic_store_explicit(&o->depth, d - 1, memory_order_relaxed);
    return;
  }
  atomic_store_explicit(&o->depth, 0, memory_order_relaxed);
  lock_unlock(o);
}

/* rlock:release(): Value unless this process holds it. */
static int l_rlock_release(lua_State *L) {
  lock_obj *o = to_sync(L, 1, T_RLOCK)->obj;
  if ((atomic_load_explicit(&o->word, memory_order_relaxed) & OWNER) != (uint32_t)luamp_self_pid())
    luamp_raise(L, "Value", "cannot release an RLock not held by this process");
  rlock_release(o);
  return 0;
}

/* The lock's own `acquire` and `release` (closures over its userdata): the common case
 * only, with self checked by identity; everything else goes to the general method, looked
 * up each time (trace.lua swaps timing wrappers in and out of the methods table). */

static int call_general(lua_State *L, int t, const char *name) {
  int n = lua_gettop(L);
  luaL_getmetatable(L, types[t].mt);
  lua_getfield(L, -1, "__index");
  lua_getfield(L, -1, name);
  lua_insert(L, 1);
  lua_pop(L, 2);
  lua_call(L, n, LUA_MULTRET);
  return lua_gettop(L);
}

/* The lock behind an own method, if self (argument 1) is its table. The table clears
 * `self` when it is collected (lock_table_gc), so an address reused by another object
 * after that never passes. */
static inline sync_ud *own_lock(lua_State *L) {
  sync_ud *u = lua_touserdata(L, lua_upvalueindex(1));
  return lua_topointer(L, 1) == u->self && u->obj ? u : NULL;
}

static int l_lock_acquire_own(lua_State *L) {
  sync_ud *u = own_lock(L);
  if (u && lua_gettop(L) == 1 && !luamp_interrupt_pending()) {   /* (see lock_wait) */
    lock_obj *o = u->obj;
    uint32_t c = 0;
    if (atomic_compare_exchange_strong_explicit(&o->word, &c, (uint32_t)luamp_self_pid(),
                                                memory_order_acquire, memory_order_relaxed)) {
      if (u->recovered) set_recovered(L, 1, u, 0);
      lua_pushboolean(L, 1);
      return 1;
    }
  }
  return call_general(L, T_LOCK, "acquire");
}

static int l_lock_release_own(lua_State *L) {
  sync_ud *u = own_lock(L);
  if (!u) return call_general(L, T_LOCK, "release");
  lock_release(L, u->obj);
  return 0;
}

static int l_rlock_acquire_own(lua_State *L) {
  sync_ud *u = own_lock(L);
  if (u) {
    lock_obj *o = u->obj;
    uint32_t me = (uint32_t)luamp_self_pid();
    uint32_t c = atomic_load_explicit(&o->word, memory_order_relaxed);
    if ((c & OWNER) == me) {
      if (rlock_deeper(o)) {
        lua_pushboolean(L, 1);
        return 1;
      }
    } else if (lua_gettop(L) == 1 && !luamp_interrupt_pending()) {   /* (see lock_wait) */
      c = 0;
      if (atomic_compare_exchange_strong_explicit(&o->word, &c, me, memory_order_acquire,
                                                  memory_order_relaxed)) {
        atomic_store_explicit(&o->depth, 1, memory_order_relaxed);
        if (u->recovered) set_recovered(L, 1, u, 0);
        lua_pushboolean(L, 1);
        return 1;
      }
    }
  }
  return call_general(L, T_RLOCK, "acquire");
}

static int l_rlock_release_own(lua_State *L) {
  sync_ud *u = own_lock(L);
  if (u && (atomic_load_explicit(&((lock_obj *)u->obj)->word, memory_order_relaxed) & OWNER) ==
               (uint32_t)luamp_self_pid()) {
    rlock_release(u->obj);
    return 0;
  }
  return call_general(L, T_RLOCK, "release");
}

/* __gc of a Lock's table: its own methods stop accepting that address as self. */
static int l_lock_table_gc(lua_State *L) {
  sync_ud *u = lock_of(L, 1);
  if (u) u->self = NULL;
  return 0;
}

static int l_lock_locked(lua_State *L) {
  sync_ud *u = to_any_lock(L, 1);
  lua_pushboolean(L, atomic_load(&((lock_obj *)u->obj)->word) != 0);
  return 1;
}

static int l_lock_tostring(lua_State *L) {
  sync_ud *u = to_any_lock_or_closed(L);
  const char *name = types[u->t].name;
  if (!u->obj) return lua_pushfstring(L, "<%s closed>", name), 1;
  lock_obj *o = u->obj;
  uint32_t c = atomic_load(&o->word);
  if (!c) lua_pushfstring(L, "<%s locked=false>", name);
  else if (u->t == T_RLOCK)
    lua_pushfstring(L, "<%s locked=true owner=%d depth=%d>", name, (int)(c & OWNER),
                    (int)atomic_load(&o->depth));
  else lua_pushfstring(L, "<%s locked=true owner=%d>", name, (int)(c & OWNER));
  return 1;
}

/* ---- Semaphore and BoundedSemaphore --------------------------------------------------- */

static int sem_try(sem_obj *o) {
  uint32_t v = atomic_load(&o->value);
  while (v > 0)
    if (atomic_compare_exchange_weak(&o->value, &v, v - 1)) return 1;
  return 0;
}

static sync_ud *to_sem(lua_State *L) {
  sync_ud *u = lua_touserdata(L, 1);
  if (u && lua_rawlen(L, 1) == sizeof *u && u->obj &&
      (u->magic == types[T_SEM].magic || u->magic == types[T_BSEM].magic))
    return u;
  return bad_self(L, 1, T_SEM);
}

/* sem:acquire([block=true], [timeout]) -> boolean */
static int l_sem_acquire(lua_State *L) {
  sync_ud *u = to_sem(L);
  sem_obj *o = u->obj;
  if (lua_gettop(L) == 1 && !luamp_interrupt_pending() && sem_try(o)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  double deadline = timeout_deadline(L, 2, 3);
  int got = 0;
  atomic_fetch_add(&o->sleepers, 1);
  for (;;) {
    /* (as in lock_wait: an acquire that raises Interrupted has taken no unit) */
    int r = luamp_interrupt_pending() ? -2 : 0;
    if (r == 0 && sem_try(o)) { got = 1; break; }
    if (r == 0) r = luamp_futex_wait(&o->value, 0, deadline);
    if (r == -2) {
      atomic_fetch_sub(&o->sleepers, 1);
      raise_interrupted(L, types[u->t].name);
    }
    if (r == 1) { got = sem_try(o); break; }
  }
  atomic_fetch_sub(&o->sleepers, 1);
  lua_pushboolean(L, got);
  return 1;
}

/* sem:release([n=1]); a BoundedSemaphore raises Value instead of exceeding its start */
static int l_sem_release(lua_State *L) {
  sync_ud *u = to_sem(L);
  sem_obj *o = u->obj;
  lua_Integer n = luaL_optinteger(L, 2, 1);
  if (n < 1) luamp_raise(L, "Value", "release count must be at least 1");
  uint32_t v = atomic_load(&o->value);
  do {
    if ((lua_Integer)(o->maxvalue - v) < n) {
      if (u->t == T_BSEM) luamp_raise(L, "Value", "BoundedSemaphore released too many times");
      luamp_raise(L, "Value", "Semaphore value would exceed %u", (unsigned)o->maxvalue);
    }
  } while (!atomic_compare_exchange_weak(&o->value, &v, v + (uint32_t)n));
  if (atomic_load(&o->sleepers)) luamp_futex_wake(&o->value, (int)(n > INT_MAX ? INT_MAX : n));
  return 0;
}

static int l_sem_get_value(lua_State *L) {
  sync_ud *u = to_sem(L);
  lua_pushinteger(L, atomic_load(&((sem_obj *)u->obj)->value));
  return 1;
}

static int l_sem_tostring(lua_State *L) {
  sync_ud *u = checked_any(L, T_SEM);
  const char *name = types[u->t].name;
  if (!u->obj) return lua_pushfstring(L, "<%s closed>", name), 1;
  sem_obj *o = u->obj;
  if (u->t == T_BSEM)
    lua_pushfstring(L, "<%s value=%I maxvalue=%I>", name, (lua_Integer)atomic_load(&o->value),
                    (lua_Integer)o->maxvalue);
  else lua_pushfstring(L, "<%s value=%I>", name, (lua_Integer)atomic_load(&o->value));
  return 1;
}

/* ---- Event ---------------------------------------------------------------------------- */

static int l_event_set(lua_State *L) {
  event_obj *o = to_sync(L, 1, T_EVENT)->obj;
  atomic_store(&o->flag, 1);
  if (atomic_load(&o->sleepers)) luamp_futex_wake(&o->flag, INT_MAX);
  return 0;
}

static int l_event_clear(lua_State *L) {
  atomic_store(&((event_obj *)to_sync(L, 1, T_EVENT)->obj)->flag, 0);
  return 0;
}

static int l_event_is_set(lua_State *L) {
  lua_pushboolean(L, atomic_load(&((event_obj *)to_sync(L, 1, T_EVENT)->obj)->flag) != 0);
  return 1;
}

/* ev:wait([timeout]) -> boolean: whether the flag is set */
static int l_event_wait(lua_State *L) {
  event_obj *o = to_sync(L, 1, T_EVENT)->obj;
  if (atomic_load(&o->flag)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  double deadline = luamp_deadline_arg(L, 2);
  atomic_fetch_add(&o->sleepers, 1);
  int r = 0;
  while (!atomic_load(&o->flag) && r != 1) {
    r = luamp_futex_wait(&o->flag, 0, deadline);
    if (r == -2) {
      atomic_fetch_sub(&o->sleepers, 1);
      raise_interrupted(L, "an Event");
    }
  }
  atomic_fetch_sub(&o->sleepers, 1);
  lua_pushboolean(L, atomic_load(&o->flag) != 0);
  return 1;
}

static int l_event_tostring(lua_State *L) {
  sync_ud *u = checked_any(L, T_EVENT);
  if (!u->obj) lua_pushliteral(L, "<Event closed>");
  else lua_pushfstring(L, "<Event set=%s>", atomic_load(&((event_obj *)u->obj)->flag) ? "true" : "false");
  return 1;
}

/* ---- Condition core -------------------------------------------------------------------
 * cv:wait(lock, [timeout]) -> notified; cv:notify(lock, n); cv:waiters(). The lock is the
 * Condition's Lock or RLock; this process must hold it. */

#define CTR_WAITER ((uint64_t)1 << 32)

static int lock_is_mine(lock_obj *o) {
  return (atomic_load(&o->word) & OWNER) == (uint32_t)luamp_self_pid();
}

/* Takes a token if one is left: returns 1 and leaves the waiters count. */
static int cond_take_token(cond_obj *o) {
  uint64_t c = atomic_load(&o->ctr);
  while (c & 0xffffffffu)
    if (atomic_compare_exchange_weak(&o->ctr, &c, c - CTR_WAITER - 1)) return 1;
  return 0;
}

/* Leaves without a wakeup, unless one arrived meanwhile (then it is ours: returns 1). */
static int cond_leave(cond_obj *o) {
  uint64_t c = atomic_load(&o->ctr);
  for (;;) {
    uint64_t n = (c & 0xffffffffu) ? c - CTR_WAITER - 1 : c - CTR_WAITER;
    if (atomic_compare_exchange_weak(&o->ctr, &c, n)) return (c & 0xffffffffu) != 0;
  }
}

static int l_cond_wait(lua_State *L) {
  cond_obj *o = to_sync(L, 1, T_COND)->obj;
  sync_ud *lu = to_any_lock(L, 2);
  lock_obj *lk = lu->obj;
  double deadline = luamp_deadline_arg(L, 3);
  if (!lock_is_mine(lk)) luamp_raise(L, "Value", "cannot wait on a Condition whose lock this process does not hold");
  atomic_fetch_add(&o->ctr, CTR_WAITER);
  uint32_t s = atomic_load(&o->seq);
  uint32_t depth = atomic_load(&lk->depth);
  atomic_store(&lk->depth, 0);
  lock_unlock(lk);
  int notified = 0, interrupted = 0;
  for (;;) {
    int r = luamp_futex_wait(&o->seq, s, deadline);
    /* read seq before looking for a token: a notify adds its tokens before bumping seq,
     * so a token we miss here makes the next futex wait return at once */
    s = atomic_load(&o->seq);
    if (cond_take_token(o)) { notified = 1; break; }
    if (r == 1 || r == -2) {
      notified = cond_leave(o);
      interrupted = r == -2;
      break;
    }
  }
  /* The lock is taken back whatever happened, as the caller's release expects it held. */
  int rec, r;
  if (interrupted) luamp_take_interrupt();
  while ((r = lock_wait(lk, (uint32_t)luamp_self_pid(), -1, 0, &rec)) == -2) interrupted |= luamp_take_interrupt();
  atomic_store(&lk->depth, depth);
  set_recovered(L, 2, lu, rec);
  if (interrupted) luamp_raise(L, "Interrupted", "interrupted while waiting for a Condition");
  lua_pushboolean(L, notified);
  return 1;
}

static int l_cond_notify(lua_State *L) {
  cond_obj *o = to_sync(L, 1, T_COND)->obj;
  lock_obj *lk = to_any_lock(L, 2)->obj;
  lua_Integer n = luaL_optinteger(L, 3, 1);
  if (!lock_is_mine(lk)) luamp_raise(L, "Value", "cannot notify on a Condition whose lock this process does not hold");
  if (n <= 0) return 0;
  uint64_t c = atomic_load(&o->ctr);
  uint64_t k;
  do {
    uint64_t waiters = c >> 32, tokens = c & 0xffffffffu;
    k = waiters > tokens ? waiters - tokens : 0;
    if ((uint64_t)n < k) k = (uint64_t)n;
    if (k == 0) return 0;
  } while (!atomic_compare_exchange_weak(&o->ctr, &c, c + k));
  atomic_fetch_add(&o->seq, 1);
  luamp_futex_wake(&o->seq, k > INT_MAX ? INT_MAX : (int)k);
  return 0;
}

static int l_cond_waiters(lua_State *L) {
  cond_obj *o = to_sync(L, 1, T_COND)->obj;
  uint64_t c = atomic_load(&o->ctr);
  uint64_t w = c >> 32, t = c & 0xffffffffu;
  lua_pushinteger(L, (lua_Integer)(w > t ? w - t : 0));
  return 1;
}

/* ---- Barrier core ---------------------------------------------------------------------- */

static int gen_broken(barrier_obj *o, uint32_t gen) {
  return (int)((o->broken_bits >> (gen % 64)) & 1);
}

/* Ends generation `gen` (which must be current), broken or not, waking everyone.
 * Called with mu held. */
static void barrier_advance(barrier_obj *o, uint32_t gen, int broken) {
  uint64_t bit = (uint64_t)1 << (gen % 64);
  uint64_t nbit = (uint64_t)1 << ((gen + 1) % 64);
  o->broken_bits = broken ? (o->broken_bits | bit) : (o->broken_bits & ~bit);
  o->broken_bits &= ~nbit;
  if (broken) atomic_store(&o->broken, 1);
  atomic_store(&o->count, 0);
  atomic_store(&o->tripping, 0);
  atomic_store(&o->gen, gen + 1);
}

static void barrier_wake(barrier_obj *o) { luamp_futex_wake(&o->gen, INT_MAX); }

/* Breaks the barrier if generation `gen` is still current. Called with mu held. */
static void barrier_break(barrier_obj *o, uint32_t gen) {
  if (atomic_load(&o->gen) == gen) barrier_advance(o, gen, 1);
  else atomic_store(&o->broken, 1);
}

static int barrier_raise(lua_State *L, int interrupted) {
  if (interrupted) {
    luamp_take_interrupt();
    luamp_raise(L, "Interrupted", "interrupted while waiting at a Barrier");
  }
  luamp_raise(L, "BrokenBarrier", "the barrier is broken");
}

static double barrier_deadline(lua_State *L, barrier_obj *o, int idx) {
  if (!lua_isnoneornil(L, idx)) return luamp_deadline_arg(L, idx);
  return o->timeout < 0 ? -1 : luamp_now() + o->timeout;
}

/* core:arrive(has_action, [timeout]) -> index, gen, last
 * The last arrival with an action gets last=true and must call core:finish(gen, ok)
 * after running it; everyone else returns when the barrier trips (or raises). */
static int l_barrier_arrive(lua_State *L) {
  barrier_obj *o = to_sync(L, 1, T_BARRIER)->obj;
  int has_action = lua_toboolean(L, 2);
  double deadline = barrier_deadline(L, o, 3);
  int failed = 0;   /* 1 broken, 2 interrupted */
  uint32_t gen, index = 0;
  mutex_lock(&o->mu);
  for (;;) {
    gen = atomic_load(&o->gen);
    if (atomic_load(&o->broken)) { failed = 1; break; }
    if (!atomic_load(&o->tripping)) break;
    /* the previous generation is still running its action: wait for it to end */
    lock_unlock(&o->mu);
    int r = luamp_futex_wait(&o->gen, gen, deadline);
    mutex_lock(&o->mu);
    if (r != 0 && atomic_load(&o->gen) == gen) {
      barrier_break(o, gen);
      failed = r == -2 ? 2 : 1;
      break;
    }
  }
  if (failed) {
    lock_unlock(&o->mu);
    barrier_wake(o);
    return barrier_raise(L, failed == 2);
  }
  index = atomic_load(&o->count);
  atomic_store(&o->count, index + 1);
  if (index + 1 == o->parties) {
    if (has_action) atomic_store(&o->tripping, 1);
    else barrier_advance(o, gen, 0);
    lock_unlock(&o->mu);
    if (!has_action) barrier_wake(o);
    lua_pushinteger(L, index);
    lua_pushinteger(L, gen);
    lua_pushboolean(L, has_action);
    return 3;
  }
  lock_unlock(&o->mu);
  int r = 0;
  while (atomic_load(&o->gen) == gen) {
    r = luamp_futex_wait(&o->gen, gen, deadline);
    if (r != 0) break;
  }
  mutex_lock(&o->mu);
  if (atomic_load(&o->gen) == gen) {   /* timed out or interrupted first: break it */
    barrier_break(o, gen);
    failed = r == -2 ? 2 : 1;
  } else if (gen_broken(o, gen)) {
    failed = 1;
  }
  lock_unlock(&o->mu);
  if (failed) {
    barrier_wake(o);
    return barrier_raise(L, failed == 2);
  }
  lua_pushinteger(L, index);
  lua_pushinteger(L, gen);
  lua_pushboolean(L, 0);
  return 3;
}

/* core:finish(gen, ok) -> true if the trip went through, false if it broke meanwhile */
static int l_barrier_finish(lua_State *L) {
  barrier_obj *o = to_sync(L, 1, T_BARRIER)->obj;
  uint32_t gen = (uint32_t)luaL_checkinteger(L, 2);
  int ok = lua_toboolean(L, 3);
  mutex_lock(&o->mu);
  int tripped = 0;
  if (atomic_load(&o->gen) == gen && atomic_load(&o->tripping)) {
    barrier_advance(o, gen, !ok);
    tripped = ok;
  }
  lock_unlock(&o->mu);
  barrier_wake(o);
  lua_pushboolean(L, tripped);
  return 1;
}

/* core:reset(): waiters of the current generation get BrokenBarrier; usable again */
static int l_barrier_reset(lua_State *L) {
  barrier_obj *o = to_sync(L, 1, T_BARRIER)->obj;
  mutex_lock(&o->mu);
  uint32_t gen = atomic_load(&o->gen);
  if (!atomic_load(&o->tripping) && atomic_load(&o->count) > 0) barrier_advance(o, gen, 1);
  atomic_store(&o->broken, 0);
  lock_unlock(&o->mu);
  barrier_wake(o);
  return 0;
}

static int l_barrier_abort(lua_State *L) {
  barrier_obj *o = to_sync(L, 1, T_BARRIER)->obj;
  mutex_lock(&o->mu);
  barrier_advance(o, atomic_load(&o->gen), 1);
  lock_unlock(&o->mu);
  barrier_wake(o);
  return 0;
}

/* core:state() -> parties, n_waiting, broken */
static int l_barrier_state(lua_State *L) {
  barrier_obj *o = to_sync(L, 1, T_BARRIER)->obj;
  lua_pushinteger(L, o->parties);
  lua_pushinteger(L, atomic_load(&o->tripping) ? 0 : atomic_load(&o->count));
  lua_pushboolean(L, atomic_load(&o->broken) != 0);
  return 3;
}

/* ---- construction, handles, lifetime ------------------------------------------------ */

static lua_Integer check_count(lua_State *L, int idx, const char *what, lua_Integer dflt,
                               lua_Integer lo) {
  if (lua_isnoneornil(L, idx)) return dflt;
  int ok;
  lua_Integer n = lua_tointegerx(L, idx, &ok);
  if (!ok) luamp_raise(L, "Value", "%s must be an integer, got %s", what, luaL_typename(L, idx));
  if (n < lo || n > INT32_MAX) luamp_raise(L, "Value", "%s out of range: %lld", what, (long long)n);
  return n;
}

/* sync_new(type_name, ...) -> object. Semaphore(value), Barrier core(parties, timeout). */
static int l_sync_new(lua_State *L) {
  int t = type_named(luaL_checkstring(L, 1));
  if (t < 0) luamp_raise(L, "Value", "unknown synchronisation type '%s'", lua_tostring(L, 1));
  lua_Integer value = 0;
  double timeout = -1;
  if (t == T_SEM || t == T_BSEM) value = check_count(L, 2, "semaphore value", 1, 0);
  if (t == T_BARRIER) {
    value = check_count(L, 2, "parties", 1, 1);
    if (!lua_isnoneornil(L, 3)) {
      if (!lua_isnumber(L, 3) || isnan(lua_tonumber(L, 3)))
        luamp_raise(L, "Value", "timeout must be a number or nil");
      timeout = lua_tonumber(L, 3);
      if (timeout < 0) timeout = 0;
      if (isinf(timeout)) timeout = -1;
    }
  }
  sync_ud *u = new_object(L, t);
  if (t == T_SEM || t == T_BSEM) {
    sem_obj *o = u->obj;
    atomic_store(&o->value, (uint32_t)value);
    o->maxvalue = t == T_BSEM ? (uint32_t)value : (uint32_t)INT32_MAX;
  } else if (t == T_BARRIER) {
    barrier_obj *o = u->obj;
    o->mu.kind = K_LOCK;
    o->parties = (uint32_t)value;
    o->timeout = timeout;
  }
  return 1;
}

/* sync_attach(type_name, payload) -> object: the receiving side of a handle. */
static int l_sync_attach(lua_State *L) {
  int t = type_named(luaL_checkstring(L, 1));
  if (t < 0) luamp_raise(L, "Value", "unknown synchronisation type '%s'", lua_tostring(L, 1));
  sync_ud *u = push_ud(L, t);
  uint32_t *kind = luamp_ref_attach(L, &u->ref, 2, types[t].objtype, types[t].size);
  if (*kind != types[t].kind) {
    luamp_ref_release(&u->ref);
    luamp_raise(L, "Value", "cannot attach shared object: it is not a %s", types[t].name);
  }
  u->obj = kind;
  if (is_lock_type(t)) wrap_lock(L);
  /* the object this process already has, if it is open: its reference stays, ours goes */
  luamp_ref_push_key(L, &u->ref);
  const char *key = lua_tostring(L, -1);
  if (luamp_handle_find(L, key)) {
    sync_ud *old = object_at(L, -1);
    if (old && old->obj && old->t == t) {
      sync_release(u);
      return 1;
    }
    lua_pop(L, 1);
  }
  luamp_handle_remember(L, -2, key);
  lua_pop(L, 1);
  return 1;
}

/* sync_payload(obj) -> payload table (pins the object) */
static int l_sync_payload(lua_State *L) {
  sync_ud *u = object_at(L, 1);
  if (!u) luamp_raise(L, "Value", "not a synchronisation object");
  if (!u->obj) luamp_raise(L, "Value", "%s is closed", types[u->t].name);
  luamp_ref_push_key(L, &u->ref);
  luamp_handle_remember(L, 1, lua_tostring(L, -1));
  lua_pop(L, 1);
  luamp_ref_push_payload(L, &u->ref);
  return 1;
}

/* __luamp_handle: obj -> "luamp.<Type>", payload */
static int l_sync_handle(lua_State *L) {
  l_sync_payload(L);
  sync_ud *u = object_at(L, 1);
  lua_pushstring(L, types[u->t].mt);
  lua_insert(L, -2);
  return 2;
}

/* close(), __close and __gc: drops this handle's reference (the object lives on while
 * other handles, here or in other processes, hold it). Idempotent. */
static int l_sync_close(lua_State *L) {
  sync_ud *u = lock_of(L, 1);   /* a Lock's table; else a userdata (its __gc too) */
  if (!u) u = any_sync(L, 1);
  if (u) sync_release(u);
  return 0;
}

static int l_sync_tostring(lua_State *L) {
  sync_ud *u = checked_any(L, T_LOCK);
  lua_pushfstring(L, "<%s%s>", types[u->t].name, u->obj ? "" : " closed");
  return 1;
}

/* sync_methods(type_name) -> the methods table of that type (luamp.sync adds to it) */
static int l_sync_methods(lua_State *L) {
  int t = type_named(luaL_checkstring(L, 1));
  if (t < 0) luamp_raise(L, "Value", "unknown synchronisation type '%s'", lua_tostring(L, 1));
  luaL_getmetatable(L, types[t].mt);
  lua_getfield(L, -1, "__index");
  return 1;
}

static void define_type(lua_State *L, int t, const luaL_Reg *methods, lua_CFunction tostring) {
  const luaL_Reg meta[] = {
    {"__gc", is_lock_type(t) ? l_lock_table_gc : l_sync_close},
    {"__close", l_sync_close},
    {"__tostring", tostring},
    {"__luamp_handle", l_sync_handle},
    {NULL, NULL}
  };
  if (is_lock_type(t)) {
    /* the userdata behind a Lock's table: only its lifetime */
    luaL_newmetatable(L, types[t].udmt);
    lua_pushcfunction(L, l_sync_close);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
  }
  luaL_newmetatable(L, types[t].mt);
  luaL_setfuncs(L, meta, 0);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_pushcfunction(L, l_sync_close);
  lua_setfield(L, -2, "close");
  if (is_lock_type(t)) {
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "recovered");
  }
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}

int luamp_open_sync(lua_State *L) {
  static const luaL_Reg lock_methods[] = {
    {"acquire", l_lock_acquire}, {"release", l_lock_release}, {"locked", l_lock_locked},
    {NULL, NULL}
  };
  static const luaL_Reg rlock_methods[] = {
    {"acquire", l_rlock_acquire}, {"release", l_rlock_release}, {"locked", l_lock_locked},
    {NULL, NULL}
  };
  static const luaL_Reg sem_methods[] = {
    {"acquire", l_sem_acquire}, {"release", l_sem_release}, {"get_value", l_sem_get_value},
    {NULL, NULL}
  };
  static const luaL_Reg event_methods[] = {
    {"set", l_event_set}, {"clear", l_event_clear}, {"is_set", l_event_is_set},
    {"wait", l_event_wait},
    {NULL, NULL}
  };
  static const luaL_Reg cond_methods[] = {
    {"wait", l_cond_wait}, {"notify", l_cond_notify}, {"waiters", l_cond_waiters},
    {NULL, NULL}
  };
  static const luaL_Reg barrier_methods[] = {
    {"arrive", l_barrier_arrive}, {"finish", l_barrier_finish}, {"reset", l_barrier_reset},
    {"abort", l_barrier_abort}, {"state", l_barrier_state},
    {NULL, NULL}
  };
  static const luaL_Reg fns[] = {
    {"sync_new", l_sync_new},
    {"sync_attach", l_sync_attach},
    {"sync_payload", l_sync_payload},
    {"sync_methods", l_sync_methods},
    {NULL, NULL}
  };
  luamp_open_arena(L);
  define_type(L, T_LOCK, lock_methods, l_lock_tostring);
  define_type(L, T_RLOCK, rlock_methods, l_lock_tostring);
  define_type(L, T_SEM, sem_methods, l_sem_tostring);
  define_type(L, T_BSEM, sem_methods, l_sem_tostring);
  define_type(L, T_EVENT, event_methods, l_event_tostring);
  define_type(L, T_COND, cond_methods, l_sync_tostring);
  define_type(L, T_BARRIER, barrier_methods, l_sync_tostring);
  luaL_setfuncs(L, fns, 0);
  return 0;
}
