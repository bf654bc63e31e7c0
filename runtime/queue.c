/*
 * queue.c — Queue, SimpleQueue and JoinableQueue: multi-producer, multi-consumer queues
 * shared by processes through one memfd and two or three eventfds.
 *
 * Memory. The memfd starts with a header page (the locks, the queue state, a small extent
 * allocator); the rest of the file is a sparse arena of page-aligned extents. Items are
 * records in a FIFO list of 256 KiB chunks: small items (up to INLINE_MAX bytes) are
 * copied into the tail chunk under the tail lock; a larger item is first copied, without
 * a lock, into an extent of its own, and then a small REF record pointing at it is
 * queued. A chunk is freed soon after the readers have left it; freed extents are kept
 * (with their pages) up to RETAIN bytes for reuse and punched out beyond that, so an
 * unbounded queue grows with its backlog and shrinks after. Put never waits for space,
 * only for maxsize.
 *
 * Locking and crashes. Two robust process-shared mutexes: producers take the tail lock
 * (the tail, the allocator, the side socket's sending end), consumers the head lock (the
 * head, task_done); nobody holds both. So one producer and one consumer never wait for
 * each other's lock, nor share a cache line but the records and the published count:
 * an item costs each side an uncontended lock of its own (a lock handed back and forth
 * per item was 42% of the time, and both sides' copies of an item ran one after the
 * other). Each side's state has two slots: a change is written to the spare one and made
 * current by one store (the allocator's state, changed rarely, goes through a redo record
 * instead), so a process killed while holding a lock leaves a whole state behind and the
 * next locker carries on (EOWNERDEAD). That one store also carries the side's count (of
 * puts, of gets: tver, hver), which is all the other side reads of it; a consumer reads
 * records only up to the count of puts, so a record whose copy was cut short, never
 * committed, simply does not exist. A large item whose copy was cut short was never linked; a large
 * item taken by a process that died while decoding it is gone. Either way only that item
 * is lost, plus the pages of its extent.
 *
 * Waiting. Blocked getters, putters and joiners each wait on their class's eventfd
 * (EFD_SEMAPHORE), through luamp_wait_fds. A waiter registers in the header's waiter
 * count for its class (an atomic count, since the waker holds the other side's lock, or
 * none) and then looks at its condition once more; whoever makes the condition true (an
 * item published, a slot freed, the last task done) publishes it and then looks at the
 * count, both with full barriers, so one of the two sees the other. It posts one token
 * per waiter it wakes and takes them off the count. A woken waiter takes a token if one
 * is left and rechecks under its lock; whoever succeeds passes the wakeup on while the
 * condition still holds. With no waiter registered, put and get make no system call. The
 * same fds let luamp.wait (and later an event loop) wait for a queue: see _wait_begin /
 * _wait_end.
 *
 * Handles. A queue crosses to another process with its descriptors (handles.c): over a
 * Connection as SCM_RIGHTS, inside a queue item through the carrying queue's side
 * socket. The side socket is an AF_UNIX datagram socket connected to itself, one more
 * descriptor of every queue. A put whose item holds luamp objects sends their
 * descriptors on it, with a fresh token, under the tail lock, and commits the item (flag
 * R_FDS) with the same token; a get pops such an item and receives its descriptors under
 * the head lock, so the socket's order is the queue's order on both ends. Tokens only grow, so
 * descriptors sent by a put that died before committing its item (older tokens) are
 * skipped and closed, and descriptors taken by a getter that died are missed (that
 * item's handles then raise Value). Descriptors of items nobody takes die with the
 * socket. Items without objects never touch the socket. For luamp.dumps a queue crosses
 * as fd numbers that only a forked child can use (checked against the memfd's
 * identity).
 */
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/futex.h>

#include "internal.h"

#define QUEUE_MT "luamp.Queue"
#define SIMPLE_MT "luamp.SimpleQueue"
#define JOINABLE_MT "luamp.JoinableQueue"

#define Q_MAGIC 0x6575657551706d6cULL   /* "lmpQueue" */
#define PAGE 4096u
#define HEADER_SIZE (2 * PAGE)
#define CHUNK_SIZE (256u * 1024)
#define CHUNK_HDR 32u
#define INLINE_MAX (32u * 1024)
#define REC_HDR 8u
#define NFREE 64
#define RETAIN (8u * 1024 * 1024)      /* freed bytes kept with their pages for reuse */
#define GROW_STEP (1024u * 1024)       /* the memfd grows in these steps */
#define NSPENT 16              /* extents a consumer keeps to free while the tail lock is busy */
#define SPENT_BACKOFF_MAX 64   /* most gets between tries at freeing extents */
#define FREE_SPIN 32           /* a consumer's spin for the tail lock, to free extents */
#define NSPARE 4               /* chunks left by consumers, handed straight to producers */
#define SPARE_WAIT 0.005       /* seconds a producer may wait for a spare chunk */
#define SPARE_IDLE 0.001       /* ... as long as the consumers took an item this recently */
#define SPARE_SPIN 64          /* rounds of that wait between looks at the consumers (a power of 2) */
#define SPIN_MIN 32            /* spin rounds (a pause each, tens of ns) */
#define SPIN_MAX 4096
#define LOCK_SPIN 200          /* first lock spin budget, in pause rounds (~20 ns each) */
#define LOCK_SPIN_MIN 100
#define LOCK_SPIN_MAX 1600
#define LOCK_WINDOW 32         /* contended lockings between budget changes */
#define SPIN_STRIDE 8
#define LOOK_GAP_MAX 128       /* most pauses between a getter's looks (see spin_while) */
#define LOCK_SLICE 0.02        /* seconds between looks at a lock that stays taken */
#define LOCK_GRACE 0.25        /* a lock held longer by a live process: wait no more */
#ifndef FUTEX_TID_MASK
#define FUTEX_TID_MASK 0x3fffffff
#define FUTEX_OWNER_DIED 0x40000000
#endif

enum { K_QUEUE, K_SIMPLE, K_JOINABLE };
enum { W_GET, W_PUT, W_JOIN, W_CLASSES };
enum { R_INLINE = 1, R_REF = 2, R_FDS = 0x100 };   /* R_FDS: descriptors on the side socket */
#define SIDE_BUFFER (4 * 1024 * 1024)   /* best effort: room for thousands of items' descriptors */
enum { Q_OK = 0, Q_TIMEOUT, Q_INTR, Q_NOMEM, Q_CORRUPT, Q_SYS, Q_SIDE_FULL, Q_TOOMANY };
/* Or'ed into what wait_until returns when it could not take the lock again. */
#define Q_UNLOCKED 0x100
#define Q_FOLLOW 0x200   /* (with Q_UNLOCKED) a task of this process has the turn */

/* What a put commits (under the tail lock), with the count of puts (tver). */
struct tstate {
  uint64_t tail_chunk, tail_pos;   /* where the next record goes */
};

/* What a get (or task_done) commits (under the head lock), with the count of gets. */
struct hstate {
  uint64_t head_chunk, head_pos;   /* next record to read */
  uint64_t done;                   /* JoinableQueue: task_done calls */
};

struct extent { uint64_t off, len, hot; };

struct qalloc {
  uint64_t top;          /* end of the arena handed out so far */
  uint64_t fsize;        /* size of the memfd; it never shrinks */
  uint64_t hot;          /* bytes in the free list whose pages are present */
  uint64_t nfree;
  struct extent freel[NFREE];
};

/* Producers and consumers each have their own lock and their own cache lines, so one
 * producer and one consumer hand items over without ever waiting for each other's lock:
 * the one line they share per item is the published put count (and the record itself). */
typedef struct qshm {
  uint64_t magic, uuid;
  uint64_t kind, maxsize;          /* maxsize 0: unbounded */
  int64_t efd_id[W_CLASSES];       /* the eventfds' ids (fdinfo), -1 if unknown */
  uint64_t side_ino;               /* the side socket's inode */
  _Alignas(64) uint32_t waiters[W_CLASSES];   /* registered waiters not yet handed a token */
  uint32_t corrupt;
  /* the producers' side: the tail lock also guards the allocator and the side socket's
   * sending end */
  _Alignas(64) pthread_mutex_t tlock;
  uint32_t al_redo;                /* an allocator commit is in progress: replay it */
  uint32_t side_token;             /* last token sent on the side socket */
  _Alignas(64) struct tstate tst[2];
  _Alignas(64) uint64_t tver;      /* puts << 1 | the slot of tst that is the state */
  /* the consumers' side */
  _Alignas(64) pthread_mutex_t hlock;
  _Alignas(64) struct hstate hst[2];
  _Alignas(64) uint64_t hver;      /* gets << 1 | the slot of hst that is the state */
  _Alignas(64) uint64_t spare[NSPARE];   /* chunks the head has left, 0: none (see take_spare) */
  _Alignas(64) struct qalloc al, al_next;
} qshm;

_Static_assert(sizeof(qshm) <= HEADER_SIZE, "queue header too large");

/* used: 0 while the chunk is the tail; set (after next) when the producers move on, to
 * where its last record ends. */
struct chunk_hdr { uint64_t size, next, used, magic; };
#define CHUNK_MAGIC 0x6b6e756863706d6cULL

typedef struct queue {
  uintptr_t cookie;          /* its own address ^ queue_secret: see to_queue */
  qshm *shm;                 /* the header, mapped on its own; NULL once closed */
  char *win;                 /* the whole memfd, remapped larger on demand */
  size_t winlen;
  uint64_t fsize_seen;       /* the memfd was at least this large (fstat) */
  int memfd;
  int efd[W_CLASSES];
  int sfd;                   /* the side socket */
  int kind;
  int spin;                  /* current spin budget, see spin_while */
  int look_gap;              /* pauses between a getter's looks at an empty queue, ditto */
  int busy;                  /* calls of this process inside a wait that may suspend a task:
                              * close must not unmap what they will touch on resuming */
  int lock_spin;             /* current lock spin budget, see q_lock */
  int lock_tries, lock_fails;   /* contended lockings in this window, and spins in vain */
  struct extent spent[NSPENT];   /* extents gets are done with, not yet freed (free_spent) */
  uint64_t mapped[8];        /* chunks recycled through the spare slots that this process
                                mapped lately (see chunk_prefault) */
  unsigned mapped_next;
  uint64_t gets_seen;        /* the consumers' count when this process last needed a chunk */
  uint64_t puts_seen;        /* the producers' count when this process last looked at it */
  pid_t owner;               /* the process spent, mapped and gets_seen are about */
  int nspent;
  int spent_skip, spent_backoff;   /* free_spent calls to let pass after a busy tail lock */
  luamp_buf tx;              /* encoded item being put, reused */
  int tx_busy;               /* a put (of some task) is using tx */
  char *rx;                  /* small item copied out under the head lock */
  size_t rx_cap;
} queue;

/* An item taken off the queue: inline bytes in q->rx, or an extent to free
 * after use; token != 0 when its descriptors came on the side socket. */
typedef struct item { int ref; uint64_t off, len; uint32_t token; } item;

static uint64_t pad8(uint64_t n) { return (n + 7) & ~(uint64_t)7; }
static uint64_t pad_page(uint64_t n) { return (n + PAGE - 1) & ~(uint64_t)(PAGE - 1); }

static void relax(int n) {
  for (int i = 0; i < n; i++) luamp_cpu_relax();
}

/* Orders the stores of a commit as other processes will see them, should this one die
 * in the middle (a compiler barrier on x86, where stores are seen in program order). */
static void barrier(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

static uint64_t puts_of(const qshm *s) { return __atomic_load_n(&s->tver, __ATOMIC_SEQ_CST) >> 1; }
static uint64_t gets_of(const qshm *s) { return __atomic_load_n(&s->hver, __ATOMIC_SEQ_CST) >> 1; }

/* Items queued, from the two published counters (without a lock: qsize, spinning);
 * garbage that says fewer were put than taken reads as empty. */
static uint64_t load_count(const qshm *s) {
  uint64_t g = gets_of(s), p = puts_of(s);
  return p > g ? p - g : 0;
}

static int ncpus(void) {
  static int n;
  if (!n) {
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    n = c > 0 ? (int)c : 1;
  }
  return n;
}

/* ---- commits: every state change is all-or-nothing under SIGKILL --------------------- */

/* The committed states. The other slot is scratch until a commit makes it current with
 * one store, so a process killed mid-commit leaves the old state whole. The same store
 * sets the side's count, the only thing of it the other side reads (seq_cst: see
 * "Waiting" above). */
static const struct tstate *tst_of(const qshm *s) { return &s->tst[s->tver & 1]; }
static const struct hstate *hst_of(const qshm *s) { return &s->hst[s->hver & 1]; }

static void tst_commit(qshm *s, const struct tstate *n, uint64_t puts) {
  uint64_t next = (s->tver & 1) ^ 1;
  s->tst[next] = *n;
  barrier();
  __atomic_store_n(&s->tver, puts << 1 | next, __ATOMIC_SEQ_CST);
}

static void hst_commit(qshm *s, const struct hstate *n, uint64_t gets) {
  uint64_t next = (s->hver & 1) ^ 1;
  s->hst[next] = *n;
  barrier();
  __atomic_store_n(&s->hver, gets << 1 | next, __ATOMIC_SEQ_CST);
}

static void al_commit(qshm *s, const struct qalloc *n) {
  s->al_next = *n;
  barrier();
  s->al_redo = 1;
  barrier();
  s->al = *n;
  barrier();
  s->al_redo = 0;
}

/* ---- eventfd tokens ------------------------------------------------------------------ */

static void post_tokens(int efd, uint64_t k) {
  ssize_t n;
  do n = write(efd, &k, sizeof k); while (n < 0 && errno == EINTR);
}

static int take_token(int efd) {
  uint64_t v;
  ssize_t n;
  do n = read(efd, &v, sizeof v); while (n < 0 && errno == EINTR);
  return n == (ssize_t)sizeof v;
}

/* Registers this process as a waiter of class w. A full barrier: whoever registers and
 * then checks the condition, and whoever changes the condition and then looks at the
 * count, cannot both miss each other. */
static void register_waiter(queue *q, int w) {
  __atomic_add_fetch(&q->shm->waiters[w], 1, __ATOMIC_SEQ_CST);
}

/* Takes up to k registrations off the count (never below zero). */
static void count_out(queue *q, int w, uint32_t k) {
  uint32_t *c = &q->shm->waiters[w];
  uint32_t v = __atomic_load_n(c, __ATOMIC_RELAXED);
  while (v > 0 && !__atomic_compare_exchange_n(c, &v, v > k ? v - k : 0, 0, __ATOMIC_SEQ_CST,
                                               __ATOMIC_RELAXED)) {
  }
}

/* Wakes one registered waiter of class w (with either lock or none: the count is
 * atomic). The token is written before the count drops, so a crash in between, or two
 * wakers at once, only leave a spurious wakeup (the woken recheck). */
static void wake_one(queue *q, int w) {
  if (q->efd[w] < 0 || __atomic_load_n(&q->shm->waiters[w], __ATOMIC_SEQ_CST) == 0) return;
  post_tokens(q->efd[w], 1);
  count_out(q, w, 1);
}

static void wake_all(queue *q, int w) {
  uint32_t k = q->efd[w] < 0 ? 0 : __atomic_load_n(&q->shm->waiters[w], __ATOMIC_SEQ_CST);
  if (k == 0) return;
  post_tokens(q->efd[w], k);
  count_out(q, w, k);
}

/* A registered waiter leaving without being handed a token (timeout, interrupt, done
 * by itself). If every registration has been handed a token, one of them is ours. */
static void unregister(queue *q, int w) {
  uint32_t *c = &q->shm->waiters[w];
  uint32_t v = __atomic_load_n(c, __ATOMIC_RELAXED);
  while (v > 0) {
    if (__atomic_compare_exchange_n(c, &v, v - 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return;
  }
  take_token(q->efd[w]);
}

static int has_room(const qshm *s) { return s->maxsize == 0 || load_count(s) < s->maxsize; }

static int has_waiters(const qshm *s, int w) {
  return __atomic_load_n(&s->waiters[w], __ATOMIC_SEQ_CST) != 0;
}

/* Passes wakeups on while their conditions hold (called after every change or
 * departure). The counts are looked at first: with nobody waiting, a put does not read
 * the consumers' count (a cache line they write at every get), nor a get the
 * producers'. */
static void chain_wakeups(queue *q) {
  const qshm *s = q->shm;
  if (has_waiters(s, W_GET) && load_count(s) > 0) wake_one(q, W_GET);
  if (has_waiters(s, W_PUT) && has_room(s)) wake_one(q, W_PUT);
}

/* ---- fault injection for the crash specs ----------------------------------------------
 * _core._queue_stall(point, fd) makes this process, on reaching `point`, write one byte to
 * fd and stop there for good, so a spec can SIGKILL it at exactly that point. */
enum { STALL_NONE, STALL_LOCKED_PUT, STALL_LOCKED_GET, STALL_REF_COPY, STALL_REF_GET,
       STALL_CHUNK_LINK };
static int stall_point, stall_fd = -1;

static void stall_here(int point) {
  if (stall_point != point) return;
  char c = 's';
  ssize_t n;
  do n = write(stall_fd, &c, 1); while (n < 0 && errno == EINTR);
  for (;;) pause();
}

/* ---- the locks ------------------------------------------------------------------------ */

enum { L_TAIL, L_HEAD };   /* producers' and consumers' lock; never both held at once */

static pthread_mutex_t *lock_of(qshm *s, int which) {
  return which == L_TAIL ? &s->tlock : &s->hlock;
}

/* The previous holder died: replay its half-done commit and wake everyone, since its
 * wakeups may be lost. */
static void recover(queue *q, int which) {
  qshm *s = q->shm;
  if (which == L_TAIL && s->al_redo) { s->al = s->al_next; s->al_redo = 0; }
  for (int w = 0; w < W_CLASSES; w++) wake_all(q, w);
}

/* Whether a Ctrl-C is pending, without consuming it: whoever raises Interrupted takes it. */
static int interrupt_pending(void) {
  if (!luamp_take_interrupt()) return 0;
  luamp_request_interrupt();
  return 1;
}

/* The lock word is shared memory too. glibc keeps the mutex's type in it: garbage there
 * sends pthread_mutex_lock down paths that assert or wait for ever, so the type is
 * checked against a mutex made here the same way before the lock is touched. */
static int lock_kind = -1;   /* (glibc) the __kind of a mutex made here, see lock_type_ok */

static void lock_kind_init(void) {
#ifdef __GLIBC__
  pthread_mutex_t m;
  pthread_mutexattr_t ma;
  pthread_mutexattr_init(&ma);
  pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(&m, &ma);
  pthread_mutexattr_destroy(&ma);
  lock_kind = m.__data.__kind;
  pthread_mutex_destroy(&m);
#endif
}

static inline int lock_type_ok(const pthread_mutex_t *lock) {
#ifdef __GLIBC__
  if (__builtin_expect(lock_kind < 0, 0)) lock_kind_init();
  return __atomic_load_n(&lock->__data.__kind, __ATOMIC_RELAXED) == lock_kind;
#else
  (void)lock;
  return 1;
#endif
}

/* Whether process (or thread) `tid` has the memfd of `q` mapped, from /proc/tid/maps;
 * 1 when that cannot be told (not readable). */
static int maps_queue(queue *q, pid_t tid) {
  struct stat st;
  if (fstat(q->memfd, &st) < 0) return 1;
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/maps", (int)tid);
  FILE *f = fopen(path, "re");
  if (!f) return errno != ENOENT && errno != ESRCH;
  char line[512];
  int found = 0;
  unsigned long long ino;
  while (!found && fgets(line, sizeof line, f)) {
    /* address perms offset dev inode path */
    if (sscanf(line, "%*s %*s %*s %*s %llu", &ino) == 1 && ino == (unsigned long long)st.st_ino &&
        strstr(line, "memfd:"))
      found = 1;
  }
  fclose(f);
  return found;
}

/* After a slice of waiting for the lock: whether its word names a holder that cannot
 * be one. A robust mutex's word holds the owner's thread id; the kernel marks the word
 * when that thread dies holding it. So a word that names this thread, a thread that no
 * longer exists while the word is unmarked and unchanged, or a live process that does
 * not even have the queue's memory mapped, is garbage. */
static int lock_owner_bogus(queue *q, const pthread_mutex_t *lock) {
#ifdef __GLIBC__
  uint32_t w = (uint32_t)__atomic_load_n(&lock->__data.__lock, __ATOMIC_ACQUIRE);
  uint32_t tid = w & FUTEX_TID_MASK;
  if (tid == 0 || (w & FUTEX_OWNER_DIED)) return 0;
  if ((pid_t)tid == gettid()) return 1;
  int alive = kill((pid_t)tid, 0) == 0 || errno != ESRCH;
  if (alive && maps_queue(q, (pid_t)tid)) return 0;
  return (uint32_t)__atomic_load_n(&lock->__data.__lock, __ATOMIC_ACQUIRE) == w;
#else
  (void)q; (void)lock;
  return 0;
#endif
}

/* Takes lock `which` (L_TAIL or L_HEAD). It is mostly held for a few hundred
 * nanoseconds, so a contender spins before it sleeps (glibc's robust mutex would go to
 * the kernel at once). The spin budget adapts per handle, over windows of LOCK_WINDOW
 * contended lockings: it halves when more than a quarter of the spins were in vain (a
 * holder that is not running: an oversubscribed machine) and doubles when fewer than 1 in
 * 16 were, between LOCK_SPIN_MIN and LOCK_SPIN_MAX rounds (2 to 32 us). Sleeping costs
 * more than the spin it saves: once a waiter has slept, glibc's robust lock marks the
 * word contended, and every unlock then makes a futex call (with one lock for both sides
 * and a fixed 200 rounds, 1 KiB items 1P1C fell into that convoy: 22,000 futex calls
 * and 7,600 context switches per 100k items). It sleeps in slices: between them a Ctrl-C is noticed (Q_INTR, the mark left for the caller to
 * raise) and a lock word that is garbage is recognised (Q_CORRUPT). A live holder that
 * keeps the lock (a stopped process) is waited for up to the deadline, but at least
 * LOCK_GRACE seconds, then Q_TIMEOUT; deadline < 0: for as long as it takes. */
static __attribute__((noinline)) int q_lock_slow(queue *q, int which, double deadline, int rc) {
  qshm *s = q->shm;
  pthread_mutex_t *lock = lock_of(s, which);
  int spins = rc == EBUSY && ncpus() > 1 ? q->lock_spin : 0;
  int i;
  for (i = 0; rc == EBUSY && i < spins; i++) {
    luamp_cpu_relax();
#ifdef __GLIBC__
    /* test before test-and-set: read the lock word until it looks free, so spinning
     * does not steal the cache line from the holder at every round */
    if (__atomic_load_n(&lock->__data.__lock, __ATOMIC_RELAXED) != 0) continue;
#endif
    rc = pthread_mutex_trylock(lock);
  }
  if (spins) {
    q->lock_tries++;
    q->lock_fails += rc == EBUSY;
    if (q->lock_tries == LOCK_WINDOW) {
      if (q->lock_fails * 4 > LOCK_WINDOW)
        q->lock_spin = spins / 2 < LOCK_SPIN_MIN ? LOCK_SPIN_MIN : spins / 2;
      else if (q->lock_fails * 16 < LOCK_WINDOW)
        q->lock_spin = spins * 2 > LOCK_SPIN_MAX ? LOCK_SPIN_MAX : spins * 2;
      q->lock_tries = q->lock_fails = 0;
    }
  }
  double start = rc == EBUSY ? luamp_now() : 0;
  while (rc == EBUSY || rc == ETIMEDOUT) {
    double now = luamp_now();
    if (rc == ETIMEDOUT) {
      if (interrupt_pending()) return Q_INTR;
      if (lock_owner_bogus(q, lock)) break;
      if (deadline >= 0 && now >= deadline && now - start >= LOCK_GRACE) return Q_TIMEOUT;
    }
    double until = now + LOCK_SLICE;
    struct timespec ts;
    ts.tv_sec = (time_t)until;
    ts.tv_nsec = (long)((until - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
    rc = pthread_mutex_clocklock(lock, CLOCK_MONOTONIC, &ts);
  }
  if (rc == EOWNERDEAD) {
    recover(q, which);
    pthread_mutex_consistent(lock);
    rc = 0;
  }
  if (rc != 0) {
    s->corrupt = 1;
    return Q_CORRUPT;
  }
  return Q_OK;
}

/* The uncontended case inline (one trylock); anything else in q_lock_slow. */
static inline int q_lock(queue *q, int which, double deadline) {
  pthread_mutex_t *lock = lock_of(q->shm, which);
  if (!lock_type_ok(lock)) {
    q->shm->corrupt = 1;
    return Q_CORRUPT;
  }
  int rc = pthread_mutex_trylock(lock);
  if (__builtin_expect(rc == 0, 1)) return Q_OK;
  return q_lock_slow(q, which, deadline, rc);
}

static void q_unlock(queue *q, int which) { pthread_mutex_unlock(lock_of(q->shm, which)); }

/* ---- the arena ------------------------------------------------------------------------ */

/* Whether [0, end) lies inside the memfd. Sizes and offsets in the header are only
 * trusted once this says so: a mapping beyond the end of the file raises SIGBUS when
 * touched. The file never shrinks, so the size seen last is a safe bound, and fstat is
 * only asked when something claims more. */
static __attribute__((noinline)) int in_file_slow(queue *q, uint64_t end) {
  struct stat st;
  if (fstat(q->memfd, &st) < 0 || st.st_size < 0) return 0;
  q->fsize_seen = (uint64_t)st.st_size;
  return end <= q->fsize_seen;
}

static inline int in_file(queue *q, uint64_t end) {
  return end <= q->fsize_seen || in_file_slow(q, end);
}

static __attribute__((noinline)) char *q_at_slow(queue *q, uint64_t off, uint64_t len) {
  uint64_t end = off + len;
  if (end < off || !in_file(q, end)) {
    q->shm->corrupt = 1;
    return NULL;
  }
  if (end > q->winlen) {
    uint64_t want = q->winlen ? q->winlen * 2 : 4 * GROW_STEP;
    while (want < end) want *= 2;
    void *p = q->win ? mremap(q->win, q->winlen, want, MREMAP_MAYMOVE)
                     : mmap(NULL, want, PROT_READ | PROT_WRITE, MAP_SHARED, q->memfd, 0);
    if (p == MAP_FAILED) return NULL;
    q->win = p;
    q->winlen = want;
  }
  return q->win + off;
}

/* A pointer to [off, off+len) of the memfd, growing this process's window as needed;
 * NULL (and the queue marked corrupt) for a range beyond the end of the file. Inline:
 * a range inside both the file size seen and the window (the usual case). */
static inline char *q_at(queue *q, uint64_t off, uint64_t len) {
  uint64_t end = off + len;
  if (__builtin_expect(end >= off && end <= q->fsize_seen && end <= q->winlen, 1))
    return q->win + off;
  return q_at_slow(q, off, len);
}

/* Maps [off, off+len) into this process's page tables in one call rather than one page
 * fault per page (faults are dear, most of all in a VM). Best effort. */
static void prefault(queue *q, uint64_t off, uint64_t len, int write) {
#ifdef MADV_POPULATE_WRITE
  char *p = q_at(q, off, len);
  if (p) madvise(p, len, write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ);
#else
  (void)q; (void)off; (void)len; (void)write;
#endif
}

/* Forgets what a parent process noted before it forked this one: its list of extents to
 * free (the parent frees them; twice would hand one extent out twice) and its mappings. */
static void own_notes(queue *q) {
  pid_t self = luamp_self_pid();
  if (q->owner == self) return;
  q->owner = self;
  q->nspent = q->spent_skip = q->spent_backoff = 0;
  memset(q->mapped, 0, sizeof q->mapped);
  q->gets_seen = 0;
}

/* Prefaults a chunk unless this process mapped it lately: a recycled chunk keeps its
 * pages (spare chunks are never punched), and its mapping, so a 1P1C pair recycling two
 * or three chunks makes no system call for them. Only a hint: a stale entry costs page
 * faults, nothing else. */
static void chunk_prefault(queue *q, uint64_t off, int write) {
  own_notes(q);
  for (unsigned i = 0; i < sizeof q->mapped / sizeof q->mapped[0]; i++)
    if (q->mapped[i] == off) return;
  q->mapped[q->mapped_next++ % (sizeof q->mapped / sizeof q->mapped[0])] = off;
  prefault(q, off, CHUNK_SIZE, write);
}

static void punch(queue *q, uint64_t off, uint64_t len) {
  fallocate(q->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len);
}

/* Checks an allocator state read from the header: every size, count and extent must
 * make sense and lie inside the file before the allocator acts on it. */
static int al_valid(queue *q, const struct qalloc *a) {
  if (a->fsize < HEADER_SIZE || a->fsize % PAGE || !in_file(q, a->fsize)) return 0;
  if (a->top < HEADER_SIZE || a->top % PAGE || a->top > a->fsize) return 0;
  if (a->nfree > NFREE || a->hot > a->fsize) return 0;
  for (uint64_t i = 0; i < a->nfree; i++) {
    const struct extent *e = &a->freel[i];
    if (e->off < HEADER_SIZE || e->off % PAGE || e->len == 0 || e->len % PAGE || e->hot > 1 ||
        e->off > a->top || e->len > a->top - e->off)
      return 0;
  }
  return 1;
}

static void freel_remove(struct qalloc *a, uint64_t i) {
  a->freel[i] = a->freel[--a->nfree];
}

/* Allocates len bytes (a multiple of PAGE) under the tail lock; 0 when out of memory. */
static uint64_t arena_alloc(queue *q, uint64_t len) {
  struct qalloc a = q->shm->al;
  if (!al_valid(q, &a)) {
    q->shm->corrupt = 1;
    return 0;
  }
  int64_t best = -1;
  for (uint64_t i = 0; i < a.nfree; i++) {
    struct extent *e = &a.freel[i];
    if (e->len < len) continue;
    /* smallest fit, pages present first */
    if (best < 0 || e->hot > a.freel[best].hot ||
        (e->hot == a.freel[best].hot && e->len < a.freel[best].len))
      best = (int64_t)i;
  }
  uint64_t off;
  if (best >= 0) {
    struct extent *e = &a.freel[best];
    off = e->off;
    if (e->hot) a.hot -= len;
    e->off += len;
    e->len -= len;
    if (e->len == 0) freel_remove(&a, (uint64_t)best);
  } else {
    off = a.top;
    if (off + len > a.fsize) {
      uint64_t size = (off + len + GROW_STEP - 1) / GROW_STEP * GROW_STEP;
      int rc;
      do rc = ftruncate(q->memfd, (off_t)size); while (rc < 0 && errno == EINTR);
      if (rc < 0) return 0;
      a.fsize = size;
      if (size > q->fsize_seen) q->fsize_seen = size;
    }
    a.top = off + len;
  }
  al_commit(q->shm, &a);
  return off;
}

/* Returns an extent to the free list, merging neighbours of the same kind; pages beyond
 * the RETAIN budget are given back to the system. */
static void arena_free(queue *q, uint64_t off, uint64_t len) {
  struct qalloc a = q->shm->al;
  if (!al_valid(q, &a) || off < HEADER_SIZE || off > a.top || len > a.top - off) {
    q->shm->corrupt = 1;   /* the extent is lost; nothing is freed twice */
    return;
  }
  uint64_t hot = 1;
  if (a.hot + len > RETAIN) {
    punch(q, off, len);
    hot = 0;
  }
  for (uint64_t i = 0; i < a.nfree;) {
    struct extent *e = &a.freel[i];
    if (e->hot == hot && (e->off + e->len == off || off + len == e->off)) {
      if (e->off < off) off = e->off;
      len += e->len;
      if (hot) a.hot -= e->len;
      freel_remove(&a, i);
      continue;
    }
    i++;
  }
  if (a.nfree == NFREE) {
    if (hot) punch(q, off, len);   /* the address range is lost, the memory is not */
  } else {
    a.freel[a.nfree++] = (struct extent){off, len, hot};
    if (hot) a.hot += len;
  }
  al_commit(q->shm, &a);
}

/* ---- records -------------------------------------------------------------------------- */

static struct chunk_hdr *chunk_at(queue *q, uint64_t off) {
  if (off < HEADER_SIZE || off % PAGE || off > UINT64_MAX - CHUNK_SIZE || !in_file(q, off + CHUNK_SIZE))
    return NULL;
  struct chunk_hdr *h = (struct chunk_hdr *)q_at(q, off, CHUNK_SIZE);
  if (!h || h->magic != CHUNK_MAGIC || h->size != CHUNK_SIZE) return NULL;
  return h;
}

/* A chunk the consumers have left, from the spare slots (under the tail lock); 0 if none.
 * A consumer that leaves a chunk puts it there rather than taking the tail lock to free
 * it, and a producer that needs a chunk takes it from there first: a 1P1C pair recycles
 * two or three chunks, whose pages stay mapped and in the caches, and the consumer never
 * waits for the producers' lock. When the consumers are a chunk or more behind and
 * taking items, the producer waits for one (up to SPARE_WAIT, while they took an item in
 * the last SPARE_IDLE) rather than growing the backlog into fresh pages, which cost far
 * more here (tens of microseconds a page) than the wait; a process that both puts and
 * gets, or a queue nobody is reading, does not wait. A slot's offset is checked like
 * any other; a process killed while holding a chunk between slot and list leaks it. */
static uint64_t take_spare(queue *q, uint64_t tail_chunk) {
  qshm *s = q->shm;
  double until = 0, idle_until = 0;
  uint64_t gets = 0;
  int stalled = 0;   /* the consumers took nothing in the last look's interval */
  for (int round = 0;; round++) {
    for (int i = 0; i < NSPARE; i++) {
      if (__atomic_load_n(&s->spare[i], __ATOMIC_RELAXED) == 0) continue;
      uint64_t off = __atomic_exchange_n(&s->spare[i], 0, __ATOMIC_ACQUIRE);
      if (off == tail_chunk || !chunk_at(q, off) || off > s->al.top - CHUNK_SIZE) {
        if (off) s->corrupt = 1;
        continue;
      }
      return off;
    }
    if (round == 0) {
      if (ncpus() < 2 || luamp_sched_in_task()) return 0;
      /* a hint only (read without the head lock): the consumers' chunk */
      const struct hstate *h = hst_of(s);
      if (__atomic_load_n(&h->head_chunk, __ATOMIC_RELAXED) == tail_chunk) return 0;
      /* and only when they took items since this process last needed a chunk */
      own_notes(q);
      gets = gets_of(s);
      int taking = gets != q->gets_seen;
      q->gets_seen = gets;
      if (!taking) return 0;
      double now = luamp_now();
      until = now + SPARE_WAIT;
      idle_until = now + SPARE_IDLE;
    } else if (stalled || (round & (SPARE_SPIN - 1)) == 0) {
      double now = luamp_now();
      uint64_t g = gets_of(s);
      stalled = g == gets;
      if (!stalled) { gets = g; idle_until = now + SPARE_IDLE; }
      if (now >= until || now >= idle_until) return 0;
    }
    /* Consumers that took nothing for SPARE_SPIN rounds are not running: the CPU is
     * given away at every round until they take again (they may be waiting for it: one
     * free CPU, or both processes pinned to one). A spin to the end of SPARE_IDLE cost
     * a millisecond per chunk then (1 KiB items on one CPU: 245k items/s). Consumers
     * that are taking items run elsewhere: the spin goes on without system calls. */
    if (stalled) sched_yield();
    else relax(SPIN_STRIDE);
  }
}

/* An item's bytes in two parts, head then tail (either may be empty): an encoding's head
 * and a string's own bytes go straight from the Lua string into shared memory. */
struct parts { const char *head, *tail; size_t hlen, len; };

/* Copies bytes [from, to) of the parts to dst + from. */
static void parts_copy(char *dst, const struct parts *d, size_t from, size_t to) {
  if (from < d->hlen) {
    size_t n = (to < d->hlen ? to : d->hlen) - from;
    memcpy(dst + from, d->head + from, n);
    from += n;
  }
  if (from < to) memcpy(dst + from, d->tail + (from - d->hlen), to - from);
}

/* Appends a record (under the tail lock, with room checked) and publishes it; a nonzero
 * token (R_FDS) goes in the record's first 8 bytes, before data. Consumers read a chunk
 * without the tail lock, up to the published count, so everything a published record
 * depends on (its bytes, a chunk header, the link to it) is written before the count. */
static int append(queue *q, int kind, const struct parts *d, uint64_t token) {
  qshm *s = q->shm;
  uint32_t len = (uint32_t)d->len;
  struct tstate n = *tst_of(s);
  uint32_t pre = token ? 8 : 0;
  uint64_t need = REC_HDR + pad8((uint64_t)len + pre);
  struct chunk_hdr *h = chunk_at(q, n.tail_chunk);
  if (!h || n.tail_pos < CHUNK_HDR || n.tail_pos > CHUNK_SIZE || n.tail_pos % 8)
    return Q_CORRUPT;
  /* A producer that died after linking a new chunk, before its commit, left the tail
   * chunk marked as left: unmark it before anything beyond the mark is published. */
  if (__atomic_load_n(&h->used, __ATOMIC_RELAXED) != 0 || h->next != 0) {
    __atomic_store_n(&h->used, 0, __ATOMIC_RELEASE);
    h->next = 0;
  }
  if (n.tail_pos + need > CHUNK_SIZE) {
    uint64_t off = take_spare(q, n.tail_chunk);
    int spare = off != 0;
    if (!off) off = arena_alloc(q, CHUNK_SIZE);
    if (!off) return s->corrupt ? Q_CORRUPT : Q_NOMEM;
    struct chunk_hdr *nh = (struct chunk_hdr *)q_at(q, off, CHUNK_SIZE);
    if (!nh) return Q_NOMEM;
    if (spare) chunk_prefault(q, off, 1);
    else prefault(q, off, CHUNK_SIZE, 1);
    *nh = (struct chunk_hdr){CHUNK_SIZE, 0, 0, CHUNK_MAGIC};
    h = chunk_at(q, n.tail_chunk);          /* (the window may have moved) */
    if (!h) return Q_CORRUPT;
    h->next = off;
    __atomic_store_n(&h->used, n.tail_pos, __ATOMIC_RELEASE);
    stall_here(STALL_CHUNK_LINK);
    n.tail_chunk = off;
    n.tail_pos = CHUNK_HDR;
    h = nh;                                 /* (chunk_at of the old one moved nothing) */
  }
  /* inside the chunk that chunk_at validated and mapped whole */
  char *p = (char *)h + n.tail_pos;
  uint32_t rh[2] = {len + pre, (uint32_t)kind | (token ? R_FDS : 0)};
  memcpy(p, rh, REC_HDR);
  p += REC_HDR;
  if (token) memcpy(p, &token, 8);
  p += pre;
  if (stall_point == STALL_NONE) {   /* (the crash specs stop a put halfway through) */
    parts_copy(p, d, 0, len);
  } else {
    parts_copy(p, d, 0, len / 2);
    stall_here(STALL_LOCKED_PUT);
    parts_copy(p, d, len / 2, len);
  }
  n.tail_pos += need;
  tst_commit(s, &n, puts_of(s) + 1);
  return Q_OK;
}

static int ensure_rx(queue *q, size_t len) {
  if (q->rx_cap >= len && q->rx) return 0;
  size_t cap = len < 256 ? 256 : len;
  char *p = realloc(q->rx, cap);
  if (!p) return -1;
  q->rx = p;
  q->rx_cap = cap;
  return 0;
}

/* The tail lock if it can be had without sleeping (a try, then a short spin); 0 if not. */
static int tail_lock_soon(queue *q) {
  pthread_mutex_t *lock = &q->shm->tlock;
  if (!lock_type_ok(lock)) {
    q->shm->corrupt = 1;
    return 0;
  }
  int rc = pthread_mutex_trylock(lock);
  for (int i = 0; rc == EBUSY && i < FREE_SPIN && ncpus() > 1; i++) {
    luamp_cpu_relax();
#ifdef __GLIBC__
    if (__atomic_load_n(&lock->__data.__lock, __ATOMIC_RELAXED) != 0) continue;
#endif
    rc = pthread_mutex_trylock(lock);
  }
  if (rc == EOWNERDEAD) {
    recover(q, L_TAIL);
    pthread_mutex_consistent(lock);
    rc = 0;
  }
  return rc == 0;
}

/* Extents a consumer is done with (chunks the head has left, large items decoded) go
 * back to the allocator, which is the tail lock's, when that lock is free: a consumer
 * never waits for a producer stopped inside its lock, nor takes it while holding the
 * head lock. wait: when the list is full, wait for the lock (never with the head lock
 * held). A process killed with extents listed leaks them (never frees them twice). */
static void free_spent(queue *q, int wait) {
  own_notes(q);
  if (q->nspent == 0) return;
  if (!wait && q->spent_skip > 0) {
    q->spent_skip--;
    return;
  }
  if (wait ? q_lock(q, L_TAIL, -1) != Q_OK : !tail_lock_soon(q)) {
    /* The producers are busy in their lock (a 1P1C pair with small records holds it
     * most of the time): trying at every get spun 200 rounds in vain 20,000 times per
     * 100k 1 KiB items, slowing the consumer so much that the producer ran ahead into
     * fresh chunks, which gave more extents to free. Try less often after each miss. */
    q->spent_backoff = q->spent_backoff ? q->spent_backoff * 2 : 1;
    if (q->spent_backoff > SPENT_BACKOFF_MAX) q->spent_backoff = SPENT_BACKOFF_MAX;
    q->spent_skip = q->spent_backoff;
    return;
  }
  for (int i = 0; i < q->nspent; i++) arena_free(q, q->spent[i].off, q->spent[i].len);
  q_unlock(q, L_TAIL);
  q->nspent = 0;
  q->spent_backoff = q->spent_skip = 0;
}

/* (head_locked: the list full, the extent is leaked rather than the tail lock taken) */
static void spend(queue *q, uint64_t off, uint64_t len, int head_locked) {
  own_notes(q);
  if (q->nspent == NSPENT && !head_locked) free_spent(q, 1);
  if (q->nspent < NSPENT) q->spent[q->nspent++] = (struct extent){off, len, 0};
}

/* Hands a chunk the head has left to the producers (see take_spare), or to the
 * allocator if the slots are full. */
static void give_spare(queue *q, uint64_t off) {
  for (int i = 0; i < NSPARE; i++) {
    uint64_t empty = 0;
    if (__atomic_compare_exchange_n(&q->shm->spare[i], &empty, off, 0, __ATOMIC_RELEASE,
                                    __ATOMIC_RELAXED))
      return;
  }
  spend(q, off, CHUNK_SIZE, 1);
}

/* Takes the first record (under the head lock, with an item published): an inline item
 * is copied to q->rx. Reads the producers' chunk without their lock, and validates
 * everything it reads, since the memory is shared. */
/* small: 0, or pop only a record of at most that many bytes kept inline without
 * descriptors (else Q_TIMEOUT, nothing taken). pop_in works on n, a copy of the head
 * state, and counts the records it takes in *pend without committing them (leaving a
 * chunk commits, pending takes and all, before the chunk goes back); the caller commits
 * (pop: each record; hand_on: a batch of them, one store for the lot). */
static int pop_in(queue *q, struct hstate *hs, uint64_t *pend, item *it, uint64_t small) {
  qshm *s = q->shm;
  struct hstate n = *hs;
  /* a published item lies at most one chunk further: a longer chain of chunks left
   * without a record is garbage (a cycle), not followed for ever */
  for (int hops = 0;; hops++) {
    if (hops > 2) return Q_CORRUPT;
    struct chunk_hdr *h = chunk_at(q, n.head_chunk);
    if (!h || n.head_pos < CHUNK_HDR || n.head_pos > CHUNK_SIZE || n.head_pos % 8) return Q_CORRUPT;
    uint64_t used = __atomic_load_n(&h->used, __ATOMIC_ACQUIRE);
    if (used > CHUNK_SIZE || (used != 0 && n.head_pos > used)) return Q_CORRUPT;
    if (used != 0 && n.head_pos == used) {
      uint64_t old = n.head_chunk;
      n.head_chunk = h->next;
      n.head_pos = CHUNK_HDR;
      if (n.head_chunk == old || !chunk_at(q, n.head_chunk)) return Q_CORRUPT;
      hst_commit(s, &n, gets_of(s) + *pend);
      *pend = 0;
      *hs = n;
      give_spare(q, old);
      chunk_prefault(q, n.head_chunk, 0);
      continue;
    }
    uint64_t end = used ? used : CHUNK_SIZE;
    if (end - n.head_pos < REC_HDR) return Q_CORRUPT;
    const char *p = (const char *)h + n.head_pos;   /* (chunk_at mapped it whole) */
    uint32_t rh[2];
    memcpy(rh, p, REC_HDR);
    uint64_t len = rh[0];
    if (REC_HDR + pad8(len) > end - n.head_pos) return Q_CORRUPT;
    int fds = (rh[1] & R_FDS) != 0;
    uint32_t kind = rh[1] & ~(uint32_t)R_FDS;
    uint64_t token = 0;
    const char *body = p + REC_HDR;
    uint64_t blen = len;
    if (small && (fds || kind != R_INLINE || len > small)) return Q_TIMEOUT;
    if (fds) {
      if (len < 8) return Q_CORRUPT;
      memcpy(&token, body, 8);
      if ((uint32_t)token == 0) return Q_CORRUPT;
      body += 8;
      blen -= 8;
    }
    if (kind == R_INLINE) {
      if (blen > INLINE_MAX) return Q_CORRUPT;
      if (ensure_rx(q, blen) < 0) return Q_NOMEM;
      memcpy(q->rx, body, blen);
      *it = (item){0, 0, blen, (uint32_t)token};
    } else if (kind == R_REF && blen == 16) {
      uint64_t ref[2];
      memcpy(ref, body, 16);
      if (ref[0] < HEADER_SIZE || ref[0] % PAGE || ref[1] <= INLINE_MAX ||
          ref[1] > UINT64_MAX - 2 * PAGE || ref[0] > UINT64_MAX - pad_page(ref[1]) ||
          !in_file(q, ref[0] + pad_page(ref[1])))
        return Q_CORRUPT;
      *it = (item){1, ref[0], ref[1], (uint32_t)token};
    } else {
      return Q_CORRUPT;
    }
    stall_here(STALL_LOCKED_GET);
    n.head_pos += REC_HDR + pad8(len);
    *hs = n;
    ++*pend;
    return Q_OK;
  }
}

static int pop(queue *q, item *it, uint64_t small) {
  qshm *s = q->shm;
  struct hstate n = *hst_of(s);
  uint64_t pend = 0;
  int rc = pop_in(q, &n, &pend, it, small);
  if (pend) hst_commit(s, &n, gets_of(s) + pend);
  return rc;
}

/* ---- blocking -------------------------------------------------------------------------- */

/* Before sleeping, spins a little (on a multi-CPU machine) while the queue is empty or
 * full, so that a busy producer-consumer pair hands items over without system calls.
 * The budget adapts per object: it doubles when a spin ends in success and halves when
 * it ends in vain (the other side is not running, or the machine is busy).
 *
 * A getter looks at the producers' count every look_gap pauses, and that gap adapts too.
 * Each look pulls the count's cache line away from the producer, whose next commit (a
 * full barrier, and its lock's release) then waits for the line to come back: with a
 * consumer faster than its producer looking every 8 pauses (~170 ns here), the producer
 * of 1 KiB items spent most of its time stalled in that commit. So a spin that ends at
 * its first look (the items come faster than the gap: a stream) doubles the gap, up to
 * LOOK_GAP_MAX (~2.7 us), and the producer fills several records undisturbed, which the
 * getter then takes one after the other without a look at the count (items_ready); a spin
 * that needs more looks (a reply that comes later than the gap: ping-pong) halves it,
 * down to SPIN_STRIDE, so a handover that waits for the other side stays prompt; a
 * spin in vain starts again from SPIN_STRIDE. */
/* (Callers skip the call, without a look at the producers' line, when it cannot spin: a
 * put to an unbounded queue, never full; a get while items are known to be there, see
 * items_ready.) */
static void spin_while(queue *q, int for_room) {
  const qshm *s = q->shm;
  if (ncpus() < 2) return;
  /* the other side may be a task of this process: a task spins only when no other one
   * is ready to run (one that waits for something else is held up by one short spin at
   * most: the budget halves when a spin ends in vain) */
  if (luamp_sched_in_task() && !luamp_sched_alone()) return;
  int i = 0;
  /* a look every few pauses: each look pulls the state's cache line away from the
   * process that is about to change it */
  if (for_room) {
    while (i < q->spin && load_count(s) >= s->maxsize) i += SPIN_STRIDE, relax(SPIN_STRIDE);
  } else {
    int gap = q->look_gap < SPIN_STRIDE || q->look_gap > LOOK_GAP_MAX ? SPIN_STRIDE : q->look_gap;
    int looks = 0;
    while (i < q->spin && load_count(s) == 0) i += gap, relax(gap), looks++;
    if (i >= q->spin) q->look_gap = SPIN_STRIDE;
    else if (looks == 1) q->look_gap = gap * 2 > LOOK_GAP_MAX ? LOOK_GAP_MAX : gap * 2;
    else if (looks > 1) q->look_gap = gap / 2 < SPIN_STRIDE ? SPIN_STRIDE : gap / 2;
  }
  if (i == 0) return;
  if (i < q->spin) q->spin = q->spin * 2 > SPIN_MAX ? SPIN_MAX : q->spin * 2;
  else q->spin = q->spin / 2 < SPIN_MIN ? SPIN_MIN : q->spin / 2;
}

/* Waits (lock not held) for a token of class w; returns Q_OK when woken, Q_TIMEOUT when
 * the deadline passed, Q_INTR on Ctrl-C, Q_SYS on failure. */
static int wait_token(queue *q, int w, double deadline) {
  /* tasks waiting here are woken one per token (sched.c) */
  struct pollfd p = {.fd = q->efd[w], .events = POLLIN | LUAMP_POLL_ONE};
  int n = luamp_wait_fds(&p, 1, deadline);
  if (n == -2) return Q_INTR;
  if (n < 0) return Q_SYS;
  return n == 0 ? Q_TIMEOUT : Q_OK;
}

/* The common loop of get, put and join, entered and left with lock `which` held.
 * ready(q) says whether the caller can go ahead; returns Q_OK when it can. A waiter
 * registers before its last look at the condition (register_waiter). Tasks of one
 * process take turns (sched.c): one of them registers and waits on the eventfd, the
 * others wait for its turn without system calls. */
static int wait_until_turn(queue *q, int which, int w, int (*ready)(queue *), int block,
                           double deadline, int *turn, int can_yield) {
  int registered = 0;
  for (;;) {
    if (q->shm->corrupt) {
      if (registered) unregister(q, w);
      return Q_CORRUPT;
    }
    if (ready(q)) {
      if (registered) unregister(q, w);
      return Q_OK;
    }
    if (!block || (deadline >= 0 && luamp_now() >= deadline)) {
      if (registered) unregister(q, w);
      return Q_TIMEOUT;
    }
    if (!registered && !*turn && !(*turn = luamp_sched_turn_try(&q->efd[w]))) {
      q_unlock(q, which);
      if (can_yield) return Q_FOLLOW | Q_UNLOCKED;   /* the caller yields for the turn */
      int rc = luamp_sched_turn_wait(&q->efd[w], deadline);
      *turn = rc == 1;
      int lrc = q_lock(q, which, deadline);
      if (lrc != Q_OK) return lrc | Q_UNLOCKED;
      if (rc == -2) return Q_INTR;
      continue;
    }
    if (!registered) {
      register_waiter(q, w);
      registered = 1;
      continue;
    }
    q_unlock(q, which);
    int rc = wait_token(q, w, deadline);
    int err = errno;
    int lrc = q_lock(q, which, deadline);
    if (lrc != Q_OK) return lrc | Q_UNLOCKED;
    if (rc == Q_INTR || rc == Q_SYS) {
      unregister(q, w);
      chain_wakeups(q);
      errno = err;
      return rc;
    }
    if (rc == Q_OK && take_token(q->efd[w])) registered = 0;   /* a waker counted us out */
  }
}

static int wait_until_y(queue *q, int which, int w, int (*ready)(queue *), int block,
                        double deadline, int can_yield) {
  int turn = 0;
  int rc = wait_until_turn(q, which, w, ready, block, deadline, &turn, can_yield);
  /* a task given the turn while it yielded holds it though turn is 0 here */
  if (turn || luamp_sched_in_task()) luamp_sched_turn_leave(&q->efd[w]);
  return rc;
}

static int wait_until(queue *q, int which, int w, int (*ready)(queue *), int block,
                      double deadline) {
  return wait_until_y(q, which, w, ready, block, deadline, 0);
}

/* (under the head lock) */
/* The count of puts only grows, so one seen earlier is a lower bound: while the gets are
 * below it, an item is there without a look at the producers' line. Each look is a
 * cache miss for the consumer and, worse, makes the producer's next commit (a full
 * barrier) wait for that line to come back; a consumer behind the producer now looks
 * once per batch. Garbage there only sends the get to records that pop then finds
 * corrupt. */
static int items_beyond(queue *q, uint64_t gets) {
  if (q->puts_seen > gets) return 1;
  q->puts_seen = puts_of(q->shm);
  return q->puts_seen > gets;
}
static int items_ready(queue *q) { return items_beyond(q, gets_of(q->shm)); }
/* (under the tail lock) */
static int room_ready(queue *q) { return has_room(q->shm); }
/* (under the head lock) items put and not yet task_done */
static uint64_t unfinished(const qshm *s) {
  uint64_t p = puts_of(s), d = hst_of(s)->done;
  return p > d ? p - d : 0;
}
static int join_ready(queue *q) { return unfinished(q->shm) == 0; }

/* ---- the side socket: descriptors of items that hold luamp objects ------------------- */

/* Sends the descriptors with their token (under the tail lock). */
static int side_send(queue *q, uint32_t token, const luamp_fdlist *fds) {
  union { char buf[CMSG_SPACE(sizeof(int) * LUAMP_MAX_FDS)]; struct cmsghdr align; } ctl;
  memset(ctl.buf, 0, sizeof ctl.buf);
  struct iovec iov = {&token, sizeof token};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                       .msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)fds->n)};
  struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)fds->n);
  memcpy(CMSG_DATA(cm), fds->fd, sizeof(int) * (size_t)fds->n);
  ssize_t n;
  do n = sendmsg(q->sfd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL); while (n < 0 && errno == EINTR);
  if (n >= 0) return Q_OK;
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) return Q_SIDE_FULL;
  if (errno == ETOOMANYREFS) return Q_TOOMANY;
  return Q_SYS;
}

/* Receives the descriptors sent with `token` into out (under the head lock). Older
 * messages (from puts that died before committing) are closed; if a newer one comes first, this
 * item's descriptors were taken by a getter that died: out stays empty. */
static void side_recv(queue *q, uint32_t token, luamp_fdlist *out) {
  out->n = 0;
  for (;;) {
    uint32_t t = 0;
    ssize_t n;
    do n = recv(q->sfd, &t, sizeof t, MSG_PEEK | MSG_DONTWAIT); while (n < 0 && errno == EINTR);
    if (n < 0) return;
    if (n == (ssize_t)sizeof t && (int32_t)(t - token) > 0) return;
    union { char buf[CMSG_SPACE(sizeof(int) * LUAMP_MAX_FDS)]; struct cmsghdr align; } ctl;
    struct iovec iov = {&t, sizeof t};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                         .msg_controllen = sizeof ctl.buf};
    do n = recvmsg(q->sfd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC); while (n < 0 && errno == EINTR);
    if (n < 0) return;
    luamp_fdlist got = {0};
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
      if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
      size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < k; i++) {
        int fd;
        memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
        if (got.n < LUAMP_MAX_FDS) got.fd[got.n++] = fd;
        else luamp_close_fd(fd);
      }
    }
    if (n == (ssize_t)sizeof t && t == token) {
      *out = got;
      return;
    }
    luamp_fdlist_close(&got);           /* an orphan: its item was never committed */
  }
}

/* Puts a record; the tail lock is taken and released here. With fds, they go on the
 * side socket first, and the record carries their token. */
static int put_record(queue *q, int kind, const struct parts *d, int block, double deadline,
                      const luamp_fdlist *fds) {
  for (;;) {
    if (block && q->shm->maxsize) spin_while(q, 1);   /* (unbounded: never full) */
    int rc = q_lock(q, L_TAIL, block ? deadline : 0);
    if (rc != Q_OK) return rc;
    /* (the wait's bookkeeping skipped when there is room now, as there mostly is) */
    if (q->shm->maxsize == 0 && !q->shm->corrupt && !luamp_sched_in_task()) rc = Q_OK;
    else rc = wait_until(q, L_TAIL, W_PUT, room_ready, block, deadline);
    if (rc & Q_UNLOCKED) return rc & ~Q_UNLOCKED;
    /* (as in get_item_in: a put that raises Interrupted has added nothing) */
    if (rc == Q_OK && luamp_interrupt_pending()) rc = Q_INTR;
    uint32_t token = 0;
    if (rc == Q_OK && fds) {
      token = ++q->shm->side_token;
      if (token == 0) token = ++q->shm->side_token;
      rc = side_send(q, token, fds);
    }
    if (rc == Q_OK) rc = append(q, kind, d, token);
    if (rc == Q_NOMEM && q->shm->corrupt) rc = Q_CORRUPT;
    if (rc == Q_CORRUPT) q->shm->corrupt = 1;
    chain_wakeups(q);
    q_unlock(q, L_TAIL);
    if (rc != Q_SIDE_FULL) return rc;
    /* Too many items' descriptors in flight: wait for getters to take some. */
    if (!block) return Q_TIMEOUT;
    struct pollfd pf = {.fd = q->sfd, .events = POLLOUT};
    int n = luamp_wait_fds(&pf, 1, deadline);
    if (n == -2) return Q_INTR;
    if (n < 0) return Q_SYS;
    if (n == 0) return Q_TIMEOUT;
  }
}

/* Puts len bytes: inline, or copied to an extent of their own first. fds: NULL, or the
 * descriptors the item's handles need (sent on the side socket). */
static int put_bytes_in(queue *q, const struct parts *d, int block, double deadline,
                        const luamp_fdlist *fds) {
  if (fds && fds->n == 0) fds = NULL;
  size_t len = d->len;
  if (len <= INLINE_MAX) return put_record(q, R_INLINE, d, block, deadline, fds);
  uint64_t ext = pad_page(len);
  int lrc = q_lock(q, L_TAIL, block ? deadline : 0);
  if (lrc != Q_OK) return lrc;
  uint64_t off = arena_alloc(q, ext);
  q_unlock(q, L_TAIL);
  if (!off) return q->shm->corrupt ? Q_CORRUPT : Q_NOMEM;
  char *dst = q_at(q, off, ext);
  int rc = Q_NOMEM;
  if (dst) {
    prefault(q, off, ext, 1);
    parts_copy(dst, d, 0, len / 2);
    stall_here(STALL_REF_COPY);
    parts_copy(dst, d, len / 2, len);
    uint64_t ref[2] = {off, len};
    struct parts r = {(const char *)ref, NULL, sizeof ref, sizeof ref};
    rc = put_record(q, R_REF, &r, block, deadline, fds);
  }
  if (rc != Q_OK && q_lock(q, L_TAIL, -1) == Q_OK) {
    arena_free(q, off, ext);
    q_unlock(q, L_TAIL);
  }
  return rc;
}

static int get_item_in(queue *q, item *it, int block, double deadline, luamp_fdlist *fds,
                       int can_yield) {
  if (block && q->puts_seen <= gets_of(q->shm)) spin_while(q, 0);   /* (see items_ready) */
  int rc = q_lock(q, L_HEAD, block ? deadline : 0);
  if (rc != Q_OK) return rc;
  /* (the wait's bookkeeping skipped when an item is there now; a task always goes
   * through it, since it may hold the turn) */
  if (!q->shm->corrupt && items_ready(q) && !luamp_sched_in_task()) rc = Q_OK;
  else rc = wait_until_y(q, L_HEAD, W_GET, items_ready, block, deadline, can_yield);
  if (rc & Q_UNLOCKED) return rc & ~Q_UNLOCKED;
  /* A Ctrl-C that came during this get (one before it was raised by the call hook) is
   * raised when the get returns, by the hook, whatever it took: the item would be lost
   * then. It is raised here instead, with the item left in the queue. */
  if (rc == Q_OK && luamp_interrupt_pending()) rc = Q_INTR;
  if (rc == Q_OK) rc = pop(q, it, 0);
  if (rc == Q_NOMEM && q->shm->corrupt) rc = Q_CORRUPT;
  if (rc == Q_OK && it->token) side_recv(q, it->token, fds);
  if (rc == Q_CORRUPT) q->shm->corrupt = 1;
  chain_wakeups(q);
  q_unlock(q, L_HEAD);
  free_spent(q, 0);
  return rc;
}

/* A batch of takes for hand_on: the head state and the takes not committed yet, and the
 * head chunk once a take has checked it. */
struct hand_batch {
  queue *q;
  struct hstate n;
  uint64_t pend;
  const struct chunk_hdr *h;
};

/* The next small item for luamp_sched_turn_hand_on (under the head lock): its bytes stay
 * valid until the next call (in the chunk, which goes back only when a take leaves it,
 * or in q->rx). */
static int hand_next(void *arg, const char **data, size_t *len) {
  struct hand_batch *b = arg;
  queue *q = b->q;
  if (q->shm->corrupt) return 0;
  if (!items_beyond(q, gets_of(q->shm) + b->pend)) return 0;   /* (takes not committed yet) */
  const struct chunk_hdr *h = b->h;
  if (h) {
    /* the next record of the chunk the last take checked, read as pop_in reads it: a
     * small inline item without descriptors, whole before the chunk's end; anything
     * else (a new chunk, another kind, garbage) goes the long way */
    uint64_t used = __atomic_load_n(&h->used, __ATOMIC_ACQUIRE);
    uint64_t pos = b->n.head_pos;
    uint64_t end = used ? used : CHUNK_SIZE;
    if (used <= CHUNK_SIZE && pos < end && end - pos >= REC_HDR) {
      const char *p = (const char *)h + pos;
      uint32_t rh[2];
      memcpy(rh, p, REC_HDR);
      if (rh[1] == R_INLINE && rh[0] <= LUAMP_HAND_MAX && REC_HDR + pad8(rh[0]) <= end - pos) {
        stall_here(STALL_LOCKED_GET);
        b->n.head_pos = pos + REC_HDR + pad8(rh[0]);
        b->pend++;
        *data = p + REC_HDR;
        *len = rh[0];
        return 1;
      }
    }
  }
  item it;
  int rc = pop_in(q, &b->n, &b->pend, &it, LUAMP_HAND_MAX);
  if (rc == Q_CORRUPT) q->shm->corrupt = 1;
  if (rc != Q_OK) return 0;
  b->h = chunk_at(q, b->n.head_chunk);   /* (pop_in checked it: not NULL) */
  *data = q->rx;
  *len = (size_t)it.len;
  return 1;
}

/* After a get: the small items left go straight to the tasks of this process given the
 * turn and not run yet (sched.c), under one lock for the lot and with one commit for the
 * lot (each commit is a full barrier); each of them then returns its item without the
 * queue. Items with descriptors or extents wait for their getter. */
static void hand_on(queue *q) {
  const void *key = &q->efd[W_GET];
  if (!luamp_sched_turn_handable(key) || q_lock(q, L_HEAD, 0) != Q_OK) return;
  struct hand_batch b = {q, *hst_of(q->shm), 0, NULL};
  luamp_sched_turn_hand_on(key, hand_next, &b);
  if (b.pend) hst_commit(q->shm, &b.n, gets_of(q->shm) + b.pend);
  chain_wakeups(q);
  q_unlock(q, L_HEAD);
}

/* Frees the extent of a large item once it has been decoded. */
static void item_done(queue *q, const item *it) {
  if (!it->ref) return;
  spend(q, it->off, pad_page(it->len), 0);
  free_spent(q, 0);
}

/* put_bytes_in and get_item_in, counted in q->busy: inside a task they may suspend it with
 * its C frames (and the queue's mappings) still in use, while another task runs */
static int put_bytes(queue *q, const struct parts *d, int block, double deadline,
                     const luamp_fdlist *fds) {
  q->busy++;
  int rc = put_bytes_in(q, d, block, deadline, fds);
  q->busy--;
  return rc;
}

static int get_item(queue *q, item *it, int block, double deadline, luamp_fdlist *fds,
                    int can_yield) {
  q->busy++;
  int rc = get_item_in(q, it, block, deadline, fds, can_yield);
  q->busy--;
  return rc;
}

/* ---- creation and release -------------------------------------------------------------- */

static const char *const kind_mt[] = {QUEUE_MT, SIMPLE_MT, JOINABLE_MT};
static const char *const kind_name[] = {"Queue", "SimpleQueue", "JoinableQueue"};

static void queue_release(queue *q) {
  q->spent_skip = 0;
  if (q->shm) free_spent(q, 0);    /* extents still listed are leaked if the lock is busy */
  if (q->win) munmap(q->win, q->winlen);
  q->win = NULL;
  q->winlen = 0;
  if (q->shm) munmap(q->shm, HEADER_SIZE);
  q->shm = NULL;
  luamp_close_fd(q->memfd);
  q->memfd = -1;
  for (int w = 0; w < W_CLASSES; w++) {
    luamp_close_fd(q->efd[w]);
    q->efd[w] = -1;
  }
  luamp_close_fd(q->sfd);
  q->sfd = -1;
  luamp_buf_free(&q->tx);
  free(q->rx);
  q->rx = NULL;
  q->rx_cap = 0;
}

/* Random per process tree (made once, inherited by forks): a queue's cookie is its
 * address mixed with it, which no other userdata holds by chance (see to_queue). */
static uintptr_t queue_secret;

static queue *new_queue_ud(lua_State *L, int kind) {
  queue *q = lua_newuserdatauv(L, sizeof *q, 0);
  memset(q, 0, sizeof *q);
  while (queue_secret == 0) {
    if (getrandom(&queue_secret, sizeof queue_secret, GRND_NONBLOCK) != sizeof queue_secret)
      queue_secret = (uintptr_t)luamp_mono_ns() * 0x9e3779b97f4a7c15ULL ^ (uintptr_t)getpid();
  }
  q->cookie = (uintptr_t)q ^ queue_secret;
  q->memfd = -1;
  for (int w = 0; w < W_CLASSES; w++) q->efd[w] = -1;
  q->sfd = -1;
  q->kind = kind;
  q->spin = SPIN_MAX / 4;
  q->look_gap = SPIN_STRIDE;
  q->lock_spin = LOCK_SPIN;
  luamp_buf_init(&q->tx);
  luaL_setmetatable(L, kind_mt[kind]);
  return q;
}

/* The eventfd's id from /proc/self/fdinfo (Linux 6.0+), or -1 where it is not shown. */
static int64_t eventfd_id(int fd) {
  char path[64], buf[512];
  snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
  int f = open(path, O_RDONLY | O_CLOEXEC);
  if (f < 0) return -1;
  ssize_t n;
  do n = read(f, buf, sizeof buf - 1); while (n < 0 && errno == EINTR);
  luamp_close_fd(f);
  if (n <= 0) return -1;
  buf[n] = 0;
  const char *p = strstr(buf, "eventfd-id:");
  return p ? strtoll(p + 11, NULL, 10) : -1;
}

static int map_header(queue *q) {
  void *p = mmap(NULL, HEADER_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, q->memfd, 0);
  if (p == MAP_FAILED) return -1;
  q->shm = p;
  return 0;
}

static int init_shared(queue *q, uint64_t maxsize) {
  qshm *s = q->shm;
  pthread_mutexattr_t ma;
  if (pthread_mutexattr_init(&ma) != 0) return -1;
  pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST);
  int rc = pthread_mutex_init(&s->tlock, &ma);
  if (rc == 0) rc = pthread_mutex_init(&s->hlock, &ma);
  pthread_mutexattr_destroy(&ma);
  if (rc != 0) { errno = rc; return -1; }
  uint64_t uuid = 0;
  if (getrandom(&uuid, sizeof uuid, GRND_NONBLOCK) != sizeof uuid)
    uuid = (uint64_t)getpid() * 0x9e3779b97f4a7c15ULL ^ (uint64_t)(luamp_now() * 1e9);
  s->uuid = uuid;
  s->kind = (uint64_t)q->kind;
  s->maxsize = maxsize;
  /* the first chunk, where head and tail start (its pages come as it fills) */
  s->al.top = HEADER_SIZE + CHUNK_SIZE;
  s->al.fsize = HEADER_SIZE + CHUNK_SIZE;
  struct chunk_hdr *h = (struct chunk_hdr *)q_at(q, HEADER_SIZE, CHUNK_SIZE);
  if (!h) return -1;
  *h = (struct chunk_hdr){CHUNK_SIZE, 0, 0, CHUNK_MAGIC};
  s->tst[0] = (struct tstate){HEADER_SIZE, CHUNK_HDR};
  s->hst[0] = (struct hstate){HEADER_SIZE, CHUNK_HDR, 0};
  for (int w = 0; w < W_CLASSES; w++) s->efd_id[w] = q->efd[w] >= 0 ? eventfd_id(q->efd[w]) : -1;
  struct stat st;
  s->side_ino = fstat(q->sfd, &st) == 0 ? (uint64_t)st.st_ino : 0;
  barrier();
  s->magic = Q_MAGIC;
  return 0;
}

/* The side socket: a datagram socket connected to itself (an autobound abstract address;
 * once connected, only this socket may send to it). */
static int side_socket(void) {
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  socklen_t len = sizeof a;
  if (bind(fd, (struct sockaddr *)&a, sizeof(sa_family_t)) < 0 ||
      getsockname(fd, (struct sockaddr *)&a, &len) < 0 ||
      connect(fd, (struct sockaddr *)&a, len) < 0) {
    int err = errno;
    luamp_close_fd(fd);
    errno = err;
    return -1;
  }
  int size = SIDE_BUFFER;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
  return fd;
}

/* _core.queue_new(kind, maxsize) where kind is "Queue", "SimpleQueue" or "JoinableQueue" */
static int l_queue_new(lua_State *L) {
  static const char *const kinds[] = {"Queue", "SimpleQueue", "JoinableQueue", NULL};
  int kind = luaL_checkoption(L, 1, NULL, kinds);
  lua_Integer maxsize = luaL_optinteger(L, 2, 0);
  if (maxsize < 0) maxsize = 0;
  queue *q = new_queue_ud(L, kind);
  q->memfd = memfd_create("luamp-queue", MFD_CLOEXEC);
  if (q->memfd < 0) luamp_raise_errno(L, "Value", "Queue: memfd_create", errno);
  int nfd = kind == K_JOINABLE ? 3 : 2;
  for (int w = 0; w < nfd; w++) {
    q->efd[w] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK | EFD_SEMAPHORE);
    if (q->efd[w] < 0) luamp_raise_errno(L, "Value", "Queue: eventfd", errno);
  }
  q->sfd = side_socket();
  if (q->sfd < 0) luamp_raise_errno(L, "Value", "Queue: side socket", errno);
  if (ftruncate(q->memfd, HEADER_SIZE + CHUNK_SIZE) < 0)
    luamp_raise_errno(L, "Value", "Queue: ftruncate", errno);
  if (map_header(q) < 0) luamp_raise_errno(L, "Value", "Queue: mmap", errno);
  if (init_shared(q, (uint64_t)maxsize) < 0) luamp_raise_errno(L, "Value", "Queue: mutex", errno);
  return 1;
}

/* ---- Lua binding ----------------------------------------------------------------------- */

/* Every function of this file has the three metatables as upvalues 1-3, which makes the
 * type check a pointer comparison. */
static queue *to_queue(lua_State *L, int idx) {
  void *p = lua_touserdata(L, idx);
  if (!p) return NULL;
  /* A userdata of a queue's size that holds a queue's cookie is one: two API calls where
   * the metatable's check below took six (a sixth of a small item's put+get). The
   * metatable's check remains for anything else, which is then not a queue. */
  if (lua_rawlen(L, idx) == sizeof(queue) && ((queue *)p)->cookie == ((uintptr_t)p ^ queue_secret))
    return p;
  if (!lua_getmetatable(L, idx)) return NULL;
  /* (pointers compared: lua_rawequal was a third of a put's binding) */
  const void *mt = lua_topointer(L, -1);
  lua_pop(L, 1);
  for (int k = 1; k <= 3; k++)
    if (mt == lua_topointer(L, lua_upvalueindex(k))) return p;
  return NULL;
}

static queue *check_queue(lua_State *L, int idx) {
  queue *q = to_queue(L, idx);
  if (!q) luaL_typeerror(L, idx, "luamp queue");
  if (!q->shm) luamp_raise(L, "Closed", "%s is closed", kind_name[q->kind]);
  if (q->shm->corrupt) luamp_raise(L, "Value", "%s: shared memory is corrupt", kind_name[q->kind]);
  return q;
}

static void raise_status(lua_State *L, queue *q, int rc, int err, const char *timeout_kind) {
  const char *name = kind_name[q->kind];
  switch (rc) {
    case Q_TIMEOUT:
      luamp_raise(L, timeout_kind, "%s is %s", name, timeout_kind[0] == 'E' ? "empty" : "full");
    case Q_INTR: luamp_take_interrupt(); luamp_raise(L, "Interrupted", "%s: interrupted", name);
    case Q_NOMEM: luamp_raise(L, "Value", "%s: out of memory", name);
    case Q_TOOMANY:
      luamp_raise(L, "Value", "%s: too many descriptors in flight (the items queued hold too "
                  "many luamp objects; get some first)", name);
    case Q_CORRUPT: luamp_raise(L, "Value", "%s: shared memory is corrupt", name);
    default: luamp_raise_errno(L, "Value", name, err);
  }
}

/* block and timeout as in Python: block=false never waits and ignores the timeout. */
static double block_args(lua_State *L, int idx, int *block) {
  if (lua_gettop(L) < idx) {   /* q:get(), q:put(v): the usual call, with no more calls */
    *block = 1;
    return -1;
  }
  *block = lua_isnoneornil(L, idx) ? 1 : lua_toboolean(L, idx);
  if (!*block) {
    if (!lua_isnoneornil(L, idx + 1)) luamp_deadline_arg(L, idx + 1);   /* still type-checked */
    return 0;
  }
  return luamp_deadline_arg(L, idx + 1);
}

static int finish_put(lua_State *L, queue *q, int rc) {
  int err = errno;
  if (rc != Q_OK) raise_status(L, q, rc, err, "Full");
  return 0;
}

/* The buffer a put encodes into: the queue's own, kept between puts, unless another
 * task of this process is inside a put with it (waiting for room, its item still in
 * there: this put's encoding overwrote it, and that item was lost and this one sent
 * twice); then a buffer of this put's own. */
static luamp_buf *tx_take(queue *q, luamp_buf *own) {
  luamp_buf_init(own);
  if (q->tx_busy) return own;
  q->tx_busy = 1;
  q->tx.len = 0;
  return &q->tx;
}

static void tx_give(queue *q, luamp_buf *tx) {
  if (tx != &q->tx) {
    luamp_buf_free(tx);
    return;
  }
  if (q->tx.cap > 4 * 1024 * 1024) luamp_buf_free(&q->tx);   /* keep it for the next item */
  q->tx_busy = 0;
}

/* :put(v, [block], [timeout]) */
static int l_put(lua_State *L) {
  queue *q = check_queue(L, 1);
  luaL_checkany(L, 2);
  int block;
  double deadline = block_args(L, 3, &block);
  /* a plain value is copied once, from the Lua string straight into the record */
  unsigned char head[LUAMP_PLAIN_HEAD];
  struct parts d = {(const char *)head, NULL, 0, 0};
  if ((d.hlen = luamp_encode_plain(L, 2, head, &d.tail, &d.len)) != 0) {
    d.len += d.hlen;
    return finish_put(L, q, put_bytes(q, &d, block, deadline, NULL));
  }
  luamp_buf own, *tx = tx_take(q, &own);
  luamp_fdlist fds;
  if (luamp_encode_fds(L, 2, tx, "item", &fds) < 0) {
    tx_give(q, tx);
    return lua_error(L);
  }
  d = (struct parts){tx->data, NULL, tx->len, tx->len};
  /* the descriptors are borrowed from objects the item (still on the stack) keeps open */
  int rc = put_bytes(q, &d, block, deadline, &fds);
  int err = errno;
  tx_give(q, tx);
  errno = err;
  return finish_put(L, q, rc);
}

static int l_put_nowait(lua_State *L) {
  lua_settop(L, 2);
  lua_pushboolean(L, 0);
  return l_put(L);
}

/* :_put_raw(s, [block], [timeout]): bytes as they are, without the codec */
static int l_put_raw(lua_State *L) {
  queue *q = check_queue(L, 1);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  int block;
  double deadline = block_args(L, 3, &block);
  struct parts d = {s, NULL, len, len};
  return finish_put(L, q, put_bytes(q, &d, block, deadline, NULL));
}

/* Runs inside lua_pcall: pushes the item (decoded with the descriptors that came with it,
 * or as a string). */
static int push_item_protected(lua_State *L) {
  const char *data = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tointeger(L, 2);
  if (lua_toboolean(L, 3)) {
    if (luamp_decode_fds(L, data, len, 0, lua_touserdata(L, 4)) < 0) return lua_error(L);
  } else {
    lua_pushlstring(L, data, len);
  }
  return 1;
}

static int get_k(lua_State *L, int status, lua_KContext decode);

/* Pushes an item that came inline and without descriptors: decoded (a number, boolean,
 * nil or string without the decoder: its pcall and reference table cost more than the
 * value itself), or (!decode) as a string. 0, or -1 with the error pushed. */
static int push_small(lua_State *L, const char *data, size_t len, int decode) {
  const char *str = data;
  size_t slen = len;
  if (decode && luamp_decode_plain(L, data, len)) return 0;
  if (!decode || luamp_decoded_string(data, len, &str, &slen)) {
    lua_pushlstring(L, str, slen);
    return 0;
  }
  return luamp_decode(L, data, len) < 0 ? -1 : 0;
}

static int do_get(lua_State *L, int block, double deadline, int decode) {
  queue *q = check_queue(L, 1);
  item it = {0, 0, 0, 0};   /* (set by get_item on Q_OK; -O2 cannot tell) */
  luamp_fdlist fds;
  fds.n = 0;
  int rc = get_item(q, &it, block, deadline, &fds, block && luamp_sched_can_yield(L));
  if (rc == Q_FOLLOW)   /* nothing held: wait for the turn with no C stack, then again */
    return luamp_sched_turn_yield(L, &q->efd[W_GET], deadline, get_k, decode);
  if (rc != Q_OK) raise_status(L, q, rc, errno, "Empty");
  if (!it.ref && fds.n == 0) {
    if (push_small(L, q->rx, (size_t)it.len, decode) < 0) return lua_error(L);
    hand_on(q);
    return 1;
  }
  const char *data = q->rx;
  if (it.ref) {
    stall_here(STALL_REF_GET);
    /* A large item is read in place; its extent must be freed whatever the decoding does. */
    data = q_at(q, it.off, it.len);
    if (data) prefault(q, it.off, pad_page(it.len), 0);
    if (!data) {
      item_done(q, &it);
      luamp_fdlist_close(&fds);
      luamp_raise(L, "Value", "%s: out of address space", kind_name[q->kind]);
    }
  }
  /* the descriptors on the C stack are closed whatever the decoding does */
  lua_pushcfunction(L, push_item_protected);
  lua_pushlightuserdata(L, (void *)data);
  lua_pushinteger(L, (lua_Integer)it.len);
  lua_pushboolean(L, decode);
  lua_pushlightuserdata(L, &fds);
  int status = lua_pcall(L, 4, 1, 0);
  item_done(q, &it);
  luamp_fdlist_close(&fds);
  if (status != LUA_OK) return lua_error(L);
  return 1;
}

/* do_get again after a wait for the turn (see luamp_sched_turn_yield) */
static int get_k(lua_State *L, int status, lua_KContext decode) {
  (void)status;
  double deadline;
  const char *item;
  size_t len;
  int rc = luamp_sched_turn_resumed(&deadline, &item, &len);
  if (rc == 2) {   /* handed its item (hand_on) */
    if (push_small(L, item, len, (int)decode) < 0) return lua_error(L);
    return 1;
  }
  if (rc == -2) raise_status(L, check_queue(L, 1), Q_INTR, 0, "Empty");
  return do_get(L, 1, deadline, (int)decode);
}

/* :get([block], [timeout]) -> value */
static int l_get(lua_State *L) {
  int block;
  double deadline = block_args(L, 2, &block);
  return do_get(L, block, deadline, 1);
}

static int l_get_nowait(lua_State *L) { return do_get(L, 0, 0, 1); }

/* :_get_raw([block], [timeout]) -> string */
static int l_get_raw(lua_State *L) {
  int block;
  double deadline = block_args(L, 2, &block);
  return do_get(L, block, deadline, 0);
}

static int l_qsize(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)load_count(check_queue(L, 1)->shm));
  return 1;
}

static int l_empty(lua_State *L) {
  lua_pushboolean(L, load_count(check_queue(L, 1)->shm) == 0);
  return 1;
}

static int l_full(lua_State *L) {
  qshm *s = check_queue(L, 1)->shm;
  lua_pushboolean(L, s->maxsize > 0 && load_count(s) >= s->maxsize);
  return 1;
}

/* :task_done(): Value when called more times than items were put */
static int l_task_done(lua_State *L) {
  queue *q = check_queue(L, 1);
  int rc = q_lock(q, L_HEAD, -1);
  if (rc != Q_OK) raise_status(L, q, rc, 0, "Empty");
  qshm *s = q->shm;
  if (unfinished(s) == 0) {
    q_unlock(q, L_HEAD);
    luamp_raise(L, "Value", "task_done() called too many times");
  }
  struct hstate n = *hst_of(s);
  n.done++;
  hst_commit(s, &n, gets_of(s));
  if (unfinished(s) == 0) wake_all(q, W_JOIN);
  q_unlock(q, L_HEAD);
  return 0;
}

/* :join([timeout]) -> true when every item put has been task_done, false on timeout */
static int l_join(lua_State *L) {
  queue *q = check_queue(L, 1);
  double deadline = luamp_deadline_arg(L, 2);
  q->busy++;
  int rc = q_lock(q, L_HEAD, deadline);
  if (rc == Q_OK) rc = wait_until(q, L_HEAD, W_JOIN, join_ready, 1, deadline);
  else rc |= Q_UNLOCKED;
  int err = errno;
  q->busy--;
  if (rc & Q_UNLOCKED) rc &= ~Q_UNLOCKED;
  else q_unlock(q, L_HEAD);
  if (rc == Q_TIMEOUT) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (rc != Q_OK) raise_status(L, q, rc, err, "Empty");
  lua_pushboolean(L, 1);
  return 1;
}

/* :_wait_begin() -> fd to poll, or nil when an item is there now. Registers this process
 * as a getter waiting on the fd; _wait_end must follow. */
static int l_wait_begin(lua_State *L) {
  queue *q = check_queue(L, 1);
  int rc = q_lock(q, L_HEAD, -1);
  if (rc != Q_OK) raise_status(L, q, rc, 0, "Empty");
  if (items_ready(q)) {
    q_unlock(q, L_HEAD);
    return 0;
  }
  register_waiter(q, W_GET);
  if (items_ready(q)) {               /* came in before the registration was seen */
    unregister(q, W_GET);
    q_unlock(q, L_HEAD);
    return 0;
  }
  q_unlock(q, L_HEAD);
  lua_pushinteger(L, q->efd[W_GET]);
  return 1;
}

/* :_wait_end() -> whether an item is there. Leaves without taking it, so any wakeup
 * this process received is passed on. */
static int l_wait_end(lua_State *L) {
  queue *q = to_queue(L, 1);
  if (!q || !q->shm) return 0;
  if (q_lock(q, L_HEAD, -1) != Q_OK) return 0;
  if (!take_token(q->efd[W_GET])) unregister(q, W_GET);
  int ready = items_ready(q);
  chain_wakeups(q);
  q_unlock(q, L_HEAD);
  lua_pushboolean(L, ready);
  return 1;
}

/* :_waiters([class]) -> processes registered as waiting to "get" (default), "put" or
 * "join"; lets tests synchronise on a process being blocked. */
static int l_waiters(lua_State *L) {
  static const char *const classes[] = {"get", "put", "join", NULL};
  queue *q = check_queue(L, 1);
  int w = luaL_checkoption(L, 2, "get", classes);
  lua_pushinteger(L, __atomic_load_n(&q->shm->waiters[w], __ATOMIC_SEQ_CST));
  return 1;
}

static int l_close(lua_State *L) {
  queue *q = to_queue(L, 1);
  if (!q) luaL_typeerror(L, 1, "luamp queue");
  if (q->busy)   /* a task of this process waits on it: releasing now would pull the
                  * mappings and descriptors from under that wait */
    luamp_raise(L, "Value", "%s is in use by a waiting task: close it after that wait ends",
                kind_name[q->kind]);
  queue_release(q);
  return 0;
}

static int l_tostring(lua_State *L) {
  queue *q = to_queue(L, 1);
  const char *name = kind_name[q->kind];
  if (!q->shm) {
    lua_pushfstring(L, "<%s closed>", name);
    return 1;
  }
  qshm *s = q->shm;
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  lua_pushfstring(L, "<%s size=%I", name, (lua_Integer)load_count(s));
  luaL_addvalue(&b);
  if (s->maxsize) {
    lua_pushfstring(L, " maxsize=%I", (lua_Integer)s->maxsize);
    luaL_addvalue(&b);
  }
  if (q->kind == K_JOINABLE) {
    lua_pushfstring(L, " unfinished=%I", (lua_Integer)unfinished(s));
    luaL_addvalue(&b);
  }
  luaL_addchar(&b, '>');
  luaL_pushresult(&b);
  return 1;
}

static void push_identity_key(lua_State *L, const struct stat *st) {
  lua_pushfstring(L, "Queue %I:%I", (lua_Integer)st->st_dev, (lua_Integer)st->st_ino);
}

/* __luamp_handle: the queue's descriptors travel with the message (carried = true; the
 * payload holds their indexes), or, for luamp.dumps, their numbers plus the memfd's
 * identity and the queue's uuid, for a forked child that inherited them. */
static int l_handle(lua_State *L) {
  queue *q = check_queue(L, 1);
  struct stat st;
  if (fstat(q->memfd, &st) < 0) luamp_raise_errno(L, "Serialize", kind_name[q->kind], errno);
  push_identity_key(L, &st);
  luamp_handle_remember(L, 1, lua_tostring(L, -1));
  lua_pop(L, 1);
  int carried = luamp_handle_send_fd(L, q->memfd) >= 0;
  lua_pushstring(L, kind_mt[q->kind]);
  lua_createtable(L, 0, 8);
  lua_pushboolean(L, carried);
  lua_setfield(L, -2, "carried");
  lua_pushinteger(L, carried ? luamp_handle_send_fd(L, q->memfd) : q->memfd);
  lua_setfield(L, -2, "fd");
  lua_createtable(L, W_CLASSES, 0);
  for (int w = 0; w < W_CLASSES && q->efd[w] >= 0; w++) {
    lua_pushinteger(L, carried ? luamp_handle_send_fd(L, q->efd[w]) : q->efd[w]);
    lua_rawseti(L, -2, w + 1);
  }
  lua_setfield(L, -2, "efd");
  lua_pushinteger(L, carried ? luamp_handle_send_fd(L, q->sfd) : q->sfd);
  lua_setfield(L, -2, "sfd");
  if (!carried) {
    lua_pushinteger(L, (lua_Integer)st.st_ino);
    lua_setfield(L, -2, "ino");
    lua_pushinteger(L, (lua_Integer)st.st_dev);
    lua_setfield(L, -2, "dev");
    lua_pushinteger(L, (lua_Integer)q->shm->uuid);
    lua_setfield(L, -2, "uuid");
    lua_pushinteger(L, getpid());
    lua_setfield(L, -2, "pid");
  }
  return 2;
}

static int dup_fd(int fd) { return fcntl(fd, F_DUPFD_CLOEXEC, 0); }

static void not_inherited(lua_State *L, int kind, lua_Integer pid) {
  luamp_raise(L, "Value",
              "cannot receive a %s from process %lld: this process did not inherit it "
              "(and it came without its descriptors)", kind_name[kind], (long long)pid);
}

static void bad_carried(lua_State *L, int kind, const char *what) {
  luamp_raise(L, "Value", "cannot receive a %s: %s", kind_name[kind], what);
}

/* Takes descriptor `field` (an index in the payload, or payload[field][i]) for q. */
static int take_fd(lua_State *L, int kind, const char *field, int i) {
  if (i == 0) return luamp_handle_recv_fd(L, 1, field, kind_name[kind]);
  lua_getfield(L, 1, field);
  if (!lua_istable(L, -1)) luamp_raise(L, "Value", "queue handle: bad field '%s'", field);
  lua_rawgeti(L, -1, i);
  lua_setfield(L, 1, "_fd");             /* payload._fd: the index, read back below */
  lua_pop(L, 1);
  return luamp_handle_recv_fd(L, 1, "_fd", kind_name[kind]);
}

/* Rebuilds a queue from its handle: on the descriptors that came with the message (or
 * dups of inherited ones), after checking that the memfd is a queue of this kind and
 * the eventfds and side socket are the ones recorded in its header; the queue object
 * this process already has on that memfd, if any. */
static int rebuild(lua_State *L, int kind) {
  luaL_checktype(L, 1, LUA_TTABLE);
  int nfd = kind == K_JOINABLE ? 3 : 2;
  queue *q = new_queue_ud(L, kind);          /* owns every descriptor taken from here on */
  struct stat st;
  if (luamp_handle_is_carried(L, 1)) {
    q->memfd = take_fd(L, kind, "fd", 0);
    if (fstat(q->memfd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size < (off_t)HEADER_SIZE)
      bad_carried(L, kind, "the descriptor that came with it is not a queue");
    for (int w = 0; w < nfd; w++) q->efd[w] = take_fd(L, kind, "efd", w + 1);
    q->sfd = take_fd(L, kind, "sfd", 0);
  } else {
    lua_Integer fd = luamp_handle_field(L, 1, "queue handle", "fd");
    lua_Integer ino = luamp_handle_field(L, 1, "queue handle", "ino");
    lua_Integer dev = luamp_handle_field(L, 1, "queue handle", "dev");
    lua_Integer pid = luamp_handle_field(L, 1, "queue handle", "pid");
    lua_Integer sfd = luamp_handle_field(L, 1, "queue handle", "sfd");
    lua_Integer efd[W_CLASSES];
    lua_getfield(L, 1, "efd");
    if (!lua_istable(L, -1)) luamp_raise(L, "Value", "queue handle: bad field 'efd'");
    for (int w = 0; w < W_CLASSES; w++) {
      lua_rawgeti(L, -1, w + 1);
      efd[w] = luaL_optinteger(L, -1, -1);
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
    if (fd < 0 || fd > INT32_MAX || fstat((int)fd, &st) < 0 || (lua_Integer)st.st_ino != ino ||
        (lua_Integer)st.st_dev != dev)
      not_inherited(L, kind, pid);
    q->memfd = dup_fd((int)fd);
    if (q->memfd < 0) luamp_raise_errno(L, "Value", "queue: dup", errno);
    for (int w = 0; w < nfd; w++) {
      if (efd[w] < 0 || efd[w] > INT32_MAX || (q->efd[w] = dup_fd((int)efd[w])) < 0)
        not_inherited(L, kind, pid);
    }
    if (sfd < 0 || sfd > INT32_MAX || (q->sfd = dup_fd((int)sfd)) < 0) not_inherited(L, kind, pid);
    lua_Integer uuid = luamp_handle_field(L, 1, "queue handle", "uuid");
    if (map_header(q) < 0) luamp_raise_errno(L, "Value", "queue: mmap", errno);
    if ((lua_Integer)q->shm->uuid != uuid) not_inherited(L, kind, pid);
  }
  push_identity_key(L, &st);
  const char *key = lua_tostring(L, -1);
  if (luamp_handle_find(L, key)) {
    queue *old = to_queue(L, -1);
    if (old && old->shm && old->kind == kind) {
      queue_release(q);                      /* this process has it: that object it is */
      return 1;
    }
    lua_pop(L, 1);
  }
  if (!q->shm && map_header(q) < 0) luamp_raise_errno(L, "Value", "queue: mmap", errno);
  if (q->shm->magic != Q_MAGIC || q->shm->kind != (uint64_t)kind)
    bad_carried(L, kind, "its shared memory is not a queue of this kind");
  for (int w = 0; w < nfd; w++) {
    int64_t id = q->shm->efd_id[w];
    if (id >= 0 && eventfd_id(q->efd[w]) != id)
      bad_carried(L, kind, "its wakeup descriptors are not the queue's");
  }
  struct stat ss;
  if (fstat(q->sfd, &ss) < 0 || !S_ISSOCK(ss.st_mode) || (uint64_t)ss.st_ino != q->shm->side_ino)
    bad_carried(L, kind, "its side socket is not the queue's");
  luamp_handle_remember(L, -2, key);
  lua_pop(L, 1);
  return 1;
}

static int l_rebuild_queue(lua_State *L) { return rebuild(L, K_QUEUE); }
static int l_rebuild_simple(lua_State *L) { return rebuild(L, K_SIMPLE); }
static int l_rebuild_joinable(lua_State *L) { return rebuild(L, K_JOINABLE); }

static int l_stall(lua_State *L) {
  static const char *const points[] = {"none", "locked-put", "locked-get", "ref-copy", "ref-get",
                                       "chunk-link", NULL};
  stall_point = luaL_checkoption(L, 1, NULL, points);
  stall_fd = (int)luaL_optinteger(L, 2, -1);
  return 0;
}

/* _core._queue_layout() -> the shared header's field offsets and the record format's
 * sizes, for fuzz/fuzz_queue.c, which scribbles them as another process could. */
static int l_layout(lua_State *L) {
  lua_createtable(L, 0, 20);
#define LAYOUT(name, v) (lua_pushinteger(L, (lua_Integer)(v)), lua_setfield(L, -2, name))
  LAYOUT("header_size", HEADER_SIZE);
  LAYOUT("qshm_size", sizeof(qshm));
  LAYOUT("chunk_size", CHUNK_SIZE);
  LAYOUT("chunk_hdr", CHUNK_HDR);
  LAYOUT("rec_hdr", REC_HDR);
  LAYOUT("inline_max", INLINE_MAX);
  LAYOUT("lock_size", sizeof(pthread_mutex_t));
  LAYOUT("tlock", offsetof(qshm, tlock));
  LAYOUT("hlock", offsetof(qshm, hlock));
  LAYOUT("tst", offsetof(qshm, tst));
  LAYOUT("tver", offsetof(qshm, tver));
  LAYOUT("hst", offsetof(qshm, hst));
  LAYOUT("hver", offsetof(qshm, hver));
  LAYOUT("spare", offsetof(qshm, spare));
  LAYOUT("al", offsetof(qshm, al));
#undef LAYOUT
  return 1;
}

static int l_is_queue(lua_State *L) {
  lua_pushboolean(L, to_queue(L, 1) != NULL);
  return 1;
}

static int l_gc(lua_State *L) {
  queue *q = to_queue(L, 1);
  if (q) queue_release(q);
  return 0;
}

static void push_metatables(lua_State *L) {
  for (int k = 0; k < 3; k++) luaL_getmetatable(L, kind_mt[k]);
}

static void fill_metatable(lua_State *L, int kind, const luaL_Reg *methods) {
  static const luaL_Reg meta[] = {
    {"__gc", l_gc},
    {"__close", l_close},
    {"__tostring", l_tostring},
    {"__luamp_handle", l_handle},
    {NULL, NULL}
  };
  static const luaL_Reg common[] = {
    {"put", l_put},
    {"get", l_get},
    {"empty", l_empty},
    {"close", l_close},
    {"_put_raw", l_put_raw},
    {"_get_raw", l_get_raw},
    {"_wait_begin", l_wait_begin},
    {"_wait_end", l_wait_end},
    {"_waiters", l_waiters},
    {NULL, NULL}
  };
  luaL_getmetatable(L, kind_mt[kind]);
  push_metatables(L);
  luaL_setfuncs(L, meta, 3);
  lua_pushstring(L, kind_mt[kind]);
  lua_setfield(L, -2, "__name");
  lua_createtable(L, 0, 16);
  push_metatables(L);
  luaL_setfuncs(L, common, 3);
  if (methods) {
    push_metatables(L);
    luaL_setfuncs(L, methods, 3);
  }
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}

int luamp_open_queue(lua_State *L) {
  static const luaL_Reg queue_methods[] = {
    {"put_nowait", l_put_nowait},
    {"get_nowait", l_get_nowait},
    {"qsize", l_qsize},
    {"full", l_full},
    {NULL, NULL}
  };
  static const luaL_Reg joinable_methods[] = {
    {"put_nowait", l_put_nowait},
    {"get_nowait", l_get_nowait},
    {"qsize", l_qsize},
    {"full", l_full},
    {"task_done", l_task_done},
    {"join", l_join},
    {NULL, NULL}
  };
  for (int k = 0; k < 3; k++) {
    luaL_newmetatable(L, kind_mt[k]);
    lua_pop(L, 1);
  }
  fill_metatable(L, K_QUEUE, queue_methods);
  fill_metatable(L, K_SIMPLE, NULL);
  fill_metatable(L, K_JOINABLE, joinable_methods);
  static const luaL_Reg rebuilders[] = {
    {QUEUE_MT, l_rebuild_queue},
    {SIMPLE_MT, l_rebuild_simple},
    {JOINABLE_MT, l_rebuild_joinable},
    {NULL, NULL}
  };
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUAMP_HANDLES_KEY);
  push_metatables(L);
  luaL_setfuncs(L, rebuilders, 3);
  lua_pop(L, 1);
  static const luaL_Reg fns[] = {
    {"queue_new", l_queue_new},
    {"is_queue", l_is_queue},
    {"_queue_stall", l_stall},
    {"_queue_layout", l_layout},
    {NULL, NULL}
  };
  push_metatables(L);
  luaL_setfuncs(L, fns, 3);
  return 0;
}
