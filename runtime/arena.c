/*
 * arena.c — the shared arena that holds every small cross-process object (locks,
 * semaphores, events, conditions, barriers, Values, Arrays).
 *
 * One arena per process tree: a memfd, mapped MAP_SHARED, made lazily on first use and
 * sized generously (a few GiB of address space; pages only cost memory once touched).
 * Because it is a mapping of a file descriptor, a forked child simply inherits it, and
 * an unrelated process (an exec'd interpreter) can map the same memory by opening
 * /proc/<pid>/fd/<fd> of any process that has it; nothing is ever named in /dev/shm.
 *
 * Objects are blocks carved from the arena with a cross-process, lock-free allocator:
 * power-of-two size classes (64 bytes up), a bump pointer for fresh memory and one
 * Treiber stack of freed blocks per class, each head tagged against ABA. Nothing in it
 * takes a lock, so a process killed in the middle of an allocation can at worst leak a
 * block, never wedge the others. Large freed blocks give their pages back (MADV_REMOVE).
 *
 * A block lives while it has references. Every Lua handle (a userdata holding a
 * luamp_ref) is one reference, and each process keeps a list of its live handles so
 * that a luamp fork can account for the copies the child inherits: one more reference
 * per handle before the fork, made the child's after it, all dropped when the child
 * leaves (arena_child_exit). These are hooks luamp_open_arena registers with the base
 * (base.h: a fork hook and a child-exit hook); whoever forks only runs them. Each
 * reference records the process it is counted for, so copies inherited through any other
 * fork (a library's raw fork(), which may exec or not) are never dropped from the shared
 * count: at worst a block leaks, it is never freed under someone's feet. A process
 * killed by a signal leaks its blocks.
 *
 * Handles (handles.c). A handle encoded for a transport that carries descriptors (a
 * Connection, a Queue item, a Pool task or result) carries the arena's memfd, so any
 * process can map the arena, and holds one "in flight" reference: refs and the block's
 * inflight count go up by one at encoding, and the receiver adopts that reference
 * (inflight down by one, refs unchanged), so the sender may let go at once and the block
 * is freed when the last holder anywhere does. A message that is never decoded leaks its
 * in-flight reference (the block then lives as long as the arena); a message decoded
 * twice cannot adopt twice (the second decoding takes an ordinary reference, if the
 * object still exists). Every allocation gets a generation number, stored in the block
 * and in its handles, so a stale handle never attaches to a later object that reuses the
 * block. A handle encoded by luamp.dumps (no transport: the bytes may be decoded any
 * number of times, or never) pins its block for the life of the arena, and is attached
 * through /proc/<pid>/fd/<fd> of the sender.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/single_threaded.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define ARENA_MAGIC 0x316172706d61756cULL   /* "luampar1" */
#define ARENA_HEADER 4096u                  /* first page: the header; blocks follow */
#define MIN_SHIFT 6                         /* smallest block: 64 bytes, one cache line */
#define NCLASS 27
#define BLOCK_HEADER 16u
#define BIG_BLOCK (64u * 1024u)             /* freed blocks this large give pages back */

#define TAG_LIVE 0x4c495645u                /* "LIVE" ^ type when allocated */
#define TAG_FREE 0x46524545u                /* "FREE" */
#define REF_PIN 0x80000000u
#define REF_COUNT 0x7fffffffu

typedef struct arena_header {
  uint64_t magic;
  uint8_t id[16];
  uint64_t size;
  _Atomic uint64_t bump;                    /* next fresh offset */
  _Atomic uint64_t live;                    /* blocks allocated and not freed */
  _Atomic uint64_t free_head[NCLASS];       /* tag << 32 | offset >> MIN_SHIFT; 0 = empty */
  _Atomic uint32_t gen;                     /* last generation handed to a block */
} arena_header;

typedef struct block {
  _Atomic uint32_t tag;                     /* TAG_LIVE ^ type, or TAG_FREE */
  _Atomic uint32_t refs;                    /* handles in all processes; REF_PIN bit */
  _Atomic uint32_t next;                    /* free: free-list link (offset >> MIN_SHIFT);
                                             * live: the generation */
  uint8_t cls;
  uint8_t pad;
  _Atomic uint16_t inflight;                /* references held by undecoded messages */
} block;

_Static_assert(sizeof(block) == BLOCK_HEADER, "block header size");

struct luamp_arena {
  char *base;
  uint64_t size;
  int fd;
  char idhex[33];
  struct luamp_arena *next;
};

/* This process's arenas (its own plus any attached through /proc) and its live handles;
 * guarded by `mu` because an embedding host may run Lua states in several threads. */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct luamp_arena *arenas;
static struct luamp_arena *current;         /* where this process allocates */
static luamp_ref *live_refs;

static inline arena_header *header_of(struct luamp_arena *a) { return (arena_header *)a->base; }
static inline block *block_at(struct luamp_arena *a, uint64_t off) { return (block *)(a->base + off); }
static inline uint64_t class_bytes(unsigned cls) { return (uint64_t)1 << (cls + MIN_SHIFT); }

static void to_hex(const uint8_t *id, char *out) {
  static const char digits[] = "0123456789abcdef";
  for (int i = 0; i < 16; i++) {
    out[2 * i] = digits[id[i] >> 4];
    out[2 * i + 1] = digits[id[i] & 15];
  }
  out[32] = '\0';
}

/* ---- fork accounting ---------------------------------------------------------------- */

static inline block *block_of(const luamp_ref *r) {
  return (block *)((char *)r->ptr - BLOCK_HEADER);
}

/* mu stays held from prepare to child/parent, so that no other thread adds or drops a
 * reference between the count and the fork. A process that never started a thread
 * (__libc_single_threaded) has nobody to keep out, and skips it: every page the parent
 * writes around a fork is a page copied (mu's, before and after), and so is every page
 * the child writes (unlocking). For the same reason `forking` is written only when it
 * changes, and the child asks for its own pid only when it has references to take. */
static pid_t forking;   /* the pid of the process that forks, from prepare on */
static int fork_locked; /* mu is held across this fork */

static void arena_fork_prepare(void) {
  if (!__libc_single_threaded) {
    pthread_mutex_lock(&mu);
    fork_locked = 1;
  }
  pid_t me = luamp_self_pid();
  if (forking != me) forking = me;
  for (luamp_ref *r = live_refs; r; r = r->next)
    if (r->owner == forking) atomic_fetch_add(&block_of(r)->refs, 1);
}

static void arena_fork_parent(pid_t pid) {
  for (luamp_ref *r = live_refs; pid < 0 && r; r = r->next)
    if (r->owner == forking) atomic_fetch_sub(&block_of(r)->refs, 1);   /* still >= 1: ours */
  if (fork_locked) {
    fork_locked = 0;
    pthread_mutex_unlock(&mu);
  }
}

LUAMP_CHILD_PATH static void arena_fork_child(void) {
  for (luamp_ref *r = live_refs; r; r = r->next)
    if (r->owner == forking) r->owner = luamp_self_pid();
  if (fork_locked) {
    fork_locked = 0;
    pthread_mutex_unlock(&mu);
  }
}

static void init_once(void) { luamp_self_pid(); }

static pthread_once_t once = PTHREAD_ONCE_INIT;

/* ---- arenas ----------------------------------------------------------------------------- */

static struct luamp_arena *arena_wrap(char *base, uint64_t size, int fd) {
  struct luamp_arena *a = calloc(1, sizeof *a);
  if (!a) return NULL;
  a->base = base;
  a->size = size;
  a->fd = fd;
  to_hex(header_of(a)->id, a->idhex);
  a->next = arenas;
  arenas = a;
  return a;
}

static void fill_id(uint8_t id[16]) {
  ssize_t n;
  do n = getrandom(id, 16, 0); while (n < 0 && errno == EINTR);
  if (n == 16) return;
  /* no entropy source: pid and clock still make collisions between live arenas unlikely */
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  uint64_t x = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ ((uint64_t)getpid() << 40);
  memcpy(id, &x, 8);
  x = x * 6364136223846793005ULL + 1442695040888963407ULL;
  memcpy(id + 8, &x, 8);
}

/* Creates this process's arena; called with mu held. Returns NULL with errno set. */
static struct luamp_arena *arena_create(void) {
  static const uint64_t sizes[] = {4ULL << 30, 1ULL << 30, 256ULL << 20, 64ULL << 20};
  int fd = memfd_create("luamp-arena", MFD_CLOEXEC);
  if (fd < 0) return NULL;
  int err = ENOMEM;
  for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
    int rc;
    do rc = ftruncate(fd, (off_t)sizes[i]); while (rc < 0 && errno == EINTR);
    if (rc < 0) { err = errno; continue; }
    void *p = mmap(NULL, sizes[i], PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (p == MAP_FAILED) { err = errno; continue; }
    arena_header *h = p;
    h->magic = ARENA_MAGIC;
    fill_id(h->id);
    h->size = sizes[i];
    atomic_store(&h->bump, ARENA_HEADER);
    struct luamp_arena *a = arena_wrap(p, sizes[i], fd);
    if (a) return a;
    err = errno;
    munmap(p, sizes[i]);
    break;
  }
  luamp_close_fd(fd);
  errno = err;
  return NULL;
}

static struct luamp_arena *arena_map_fd(int myfd, const char *idhex, const char **why);

/* Maps the arena that process `pid` holds as fd `fd`, checking that it is the one named
 * `idhex`. Called with mu held. Returns NULL with a reason in *why. */
static struct luamp_arena *arena_attach(pid_t pid, int fd, const char *idhex, const char **why) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)pid, fd);
  int myfd;
  do myfd = open(path, O_RDWR | O_CLOEXEC); while (myfd < 0 && errno == EINTR);
  if (myfd < 0) {
    *why = "the process that sent it is gone or not accessible";
    return NULL;
  }
  return arena_map_fd(myfd, idhex, why);
}

/* Maps the arena memfd myfd (taking it over: closed on failure), checking that it is an
 * arena, the one named `idhex`. Called with mu held. */
static struct luamp_arena *arena_map_fd(int myfd, const char *idhex, const char **why) {
  struct stat st;
  arena_header h;
  ssize_t n;
  do n = pread(myfd, &h, sizeof h, 0); while (n < 0 && errno == EINTR);
  char hex[33];
  if (n == (ssize_t)sizeof h) to_hex(h.id, hex);
  if (fstat(myfd, &st) < 0 || n != (ssize_t)sizeof h || h.magic != ARENA_MAGIC ||
      h.size != (uint64_t)st.st_size || h.size < ARENA_HEADER || strcmp(hex, idhex) != 0) {
    luamp_close_fd(myfd);
    *why = "it names a shared arena that no longer exists";
    return NULL;
  }
  void *p = mmap(NULL, h.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, myfd, 0);
  if (p == MAP_FAILED) {
    luamp_close_fd(myfd);
    *why = "cannot map its shared arena";
    return NULL;
  }
  struct luamp_arena *a = arena_wrap(p, h.size, myfd);
  if (!a) {
    munmap(p, h.size);
    luamp_close_fd(myfd);
    *why = "out of memory";
  }
  return a;
}

static struct luamp_arena *arena_find(const char *idhex) {
  for (struct luamp_arena *a = arenas; a; a = a->next)
    if (strcmp(a->idhex, idhex) == 0) return a;
  return NULL;
}

/* ---- blocks ----------------------------------------------------------------------------- */

static int class_for(size_t bytes, uint64_t arena_size) {
  for (unsigned c = 0; c < NCLASS; c++) {
    uint64_t cb = class_bytes(c);
    if (cb > arena_size - ARENA_HEADER) return -1;
    if (cb >= bytes) return (int)c;
  }
  return -1;
}

static uint64_t pop_free(struct luamp_arena *a, unsigned cls) {
  _Atomic uint64_t *head = &header_of(a)->free_head[cls];
  uint64_t h = atomic_load(head);
  for (;;) {
    uint64_t idx = h & 0xffffffffu;
    if (idx == 0) return 0;
    uint64_t off = idx << MIN_SHIFT;
    /* The block may be popped and reused by another process meanwhile; then `next` is
     * garbage, but the tag in the head has moved on and the CAS fails. */
    uint32_t next = atomic_load_explicit(&block_at(a, off)->next, memory_order_relaxed);
    uint64_t nh = (((h >> 32) + 1) << 32) | next;
    if (atomic_compare_exchange_weak(head, &h, nh)) return off;
  }
}

static void push_free(struct luamp_arena *a, uint64_t off, unsigned cls) {
  _Atomic uint64_t *head = &header_of(a)->free_head[cls];
  block *b = block_at(a, off);
  uint64_t h = atomic_load(head);
  for (;;) {
    atomic_store_explicit(&b->next, (uint32_t)(h & 0xffffffffu), memory_order_relaxed);
    uint64_t nh = (((h >> 32) + 1) << 32) | (off >> MIN_SHIFT);
    if (atomic_compare_exchange_weak(head, &h, nh)) return;
  }
}

static uint64_t bump_alloc(struct luamp_arena *a, uint64_t bytes) {
  _Atomic uint64_t *bump = &header_of(a)->bump;
  uint64_t align = bytes < 4096 ? bytes : 4096;
  uint64_t cur = atomic_load(bump);
  for (;;) {
    uint64_t off = (cur + align - 1) & ~(align - 1);
    if (off > a->size || a->size - off < bytes) return 0;
    if (atomic_compare_exchange_weak(bump, &cur, off + bytes)) return off;
  }
}

/* Returns the offset of a new block of `type` with `size` zeroed payload bytes, or 0. */
static uint64_t block_alloc(struct luamp_arena *a, unsigned type, size_t size) {
  int cls = class_for(size + BLOCK_HEADER, a->size);
  if (cls < 0) return 0;
  uint64_t bytes = class_bytes((unsigned)cls);
  uint64_t off = pop_free(a, (unsigned)cls);
  if (off) {
    /* freed big blocks had their pages removed (they read as zeros); clear the rest */
    size_t dirty = size;
    if (bytes >= BIG_BLOCK && dirty > 4096 - BLOCK_HEADER) dirty = 4096 - BLOCK_HEADER;
    memset(a->base + off + BLOCK_HEADER, 0, dirty);
  } else {
    off = bump_alloc(a, bytes);
    if (!off) return 0;
  }
  block *b = block_at(a, off);
  b->cls = (uint8_t)cls;
  uint32_t gen = atomic_fetch_add(&header_of(a)->gen, 1) + 1;
  if (gen == 0) gen = atomic_fetch_add(&header_of(a)->gen, 1) + 1;
  atomic_store(&b->next, gen);
  atomic_store(&b->inflight, 0);
  atomic_store(&b->refs, 1);
  atomic_store(&b->tag, TAG_LIVE ^ type);
  atomic_fetch_add(&header_of(a)->live, 1);
  return off;
}

static void block_free(struct luamp_arena *a, uint64_t off) {
  block *b = block_at(a, off);
  uint64_t bytes = class_bytes(b->cls);
  atomic_store(&b->tag, TAG_FREE);
  if (bytes >= BIG_BLOCK) madvise(a->base + off + 4096, bytes - 4096, MADV_REMOVE);
  atomic_fetch_sub(&header_of(a)->live, 1);
  push_free(a, off, b->cls);
}

/* ---- references ----------------------------------------------------------------------- */

static void ref_link(luamp_ref *ref, struct luamp_arena *a, uint64_t off) {
  ref->arena = a;
  ref->off = (uint32_t)(off >> MIN_SHIFT);
  ref->ptr = a->base + off + BLOCK_HEADER;
  ref->owner = luamp_self_pid();
  ref->prev = NULL;
  ref->next = live_refs;
  if (live_refs) live_refs->prev = ref;
  live_refs = ref;
}

static void ref_unlink(luamp_ref *ref) {
  if (ref->prev) ref->prev->next = ref->next;
  else live_refs = ref->next;
  if (ref->next) ref->next->prev = ref->prev;
  ref->prev = ref->next = NULL;
}

/* Drops one reference to the block; frees it with the last. Called with mu held. */
static void drop(luamp_ref *ref) {
  if (ref->owner != luamp_self_pid()) return;   /* an uncounted copy from a raw fork */
  uint64_t off = (uint64_t)ref->off << MIN_SHIFT;
  block *b = block_at(ref->arena, off);
  if (atomic_fetch_sub(&b->refs, 1) == 1) block_free(ref->arena, off);
}

void *luamp_ref_alloc(lua_State *L, luamp_ref *ref, unsigned type, size_t size) {
  pthread_once(&once, init_once);
  pthread_mutex_lock(&mu);
  int err = 0;
  if (!current) {
    current = arena_create();
    if (!current) err = errno;
  }
  uint64_t off = current ? block_alloc(current, type, size) : 0;
  if (off) ref_link(ref, current, off);
  pthread_mutex_unlock(&mu);
  if (err) luamp_raise_errno(L, "Value", "cannot create the shared arena", err);
  if (!off) luamp_raise(L, "Value", "out of shared memory (asked for %zu bytes)", size);
  return ref->ptr;
}

void luamp_ref_release(luamp_ref *ref) {
  if (!ref->ptr) return;
  pthread_mutex_lock(&mu);
  ref_unlink(ref);
  drop(ref);
  ref->ptr = NULL;
  ref->arena = NULL;
  pthread_mutex_unlock(&mu);
}

size_t luamp_ref_capacity(const luamp_ref *ref) {
  block *b = block_of(ref);
  return (size_t)(class_bytes(b->cls) - BLOCK_HEADER);
}

/* The child-exit hook: drops every reference this process holds. */
LUAMP_CHILD_PATH static void arena_child_exit(void) {
  if (!live_refs && __libc_single_threaded) return;   /* nothing to drop, nobody to race */
  pthread_mutex_lock(&mu);
  while (live_refs) {
    luamp_ref *ref = live_refs;
    ref_unlink(ref);
    drop(ref);
    ref->ptr = NULL;
    ref->arena = NULL;
  }
  pthread_mutex_unlock(&mu);
}

/* Takes one in-flight reference (refs and inflight up by one); falls back to pinning
 * when the inflight count is at its limit. */
static void take_inflight(block *b) {
  uint16_t k = atomic_load(&b->inflight);
  for (;;) {
    if (k == UINT16_MAX) {
      uint32_t r = atomic_load(&b->refs);
      while (!(r & REF_PIN) && !atomic_compare_exchange_weak(&b->refs, &r, (r + 1) | REF_PIN)) {}
      return;
    }
    atomic_fetch_add(&b->refs, 1);       /* before inflight: adoption never outruns it */
    if (atomic_compare_exchange_strong(&b->inflight, &k, (uint16_t)(k + 1))) return;
    atomic_fetch_sub(&b->refs, 1);       /* ours is still counted: never the last */
  }
}

/* Adopts one in-flight reference; 0 when there is none. */
static int adopt_inflight(block *b) {
  uint16_t k = atomic_load(&b->inflight);
  while (k > 0)
    if (atomic_compare_exchange_weak(&b->inflight, &k, (uint16_t)(k - 1))) return 1;
  return 0;
}

void luamp_ref_push_payload(lua_State *L, const luamp_ref *ref) {
  block *b = block_of(ref);
  int fdi = luamp_handle_send_fd(L, ref->arena->fd);
  if (fdi >= 0) {
    take_inflight(b);
  } else {
    uint32_t r = atomic_load(&b->refs);
    /* the pin is one extra reference that nobody drops */
    while (!(r & REF_PIN) && !atomic_compare_exchange_weak(&b->refs, &r, (r + 1) | REF_PIN)) {}
  }
  lua_createtable(L, 0, 6);
  lua_pushstring(L, ref->arena->idhex);
  lua_setfield(L, -2, "arena");
  if (fdi >= 0) {
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "carried");
    lua_pushinteger(L, fdi);
    lua_setfield(L, -2, "fdi");
  } else {
    lua_pushinteger(L, luamp_self_pid());
    lua_setfield(L, -2, "pid");
    lua_pushinteger(L, ref->arena->fd);
    lua_setfield(L, -2, "fd");
  }
  lua_pushinteger(L, (lua_Integer)ref->off << MIN_SHIFT);
  lua_setfield(L, -2, "off");
  lua_pushinteger(L, (lua_Integer)atomic_load(&b->next));
  lua_setfield(L, -2, "gen");
}

void luamp_ref_push_key(lua_State *L, const luamp_ref *ref) {
  lua_pushfstring(L, "arena %s:%I:%I", ref->arena->idhex, (lua_Integer)ref->off,
                  (lua_Integer)atomic_load(&block_of(ref)->next));
}

static lua_Integer payload_int(lua_State *L, int idx, const char *field, lua_Integer lo, lua_Integer hi) {
  lua_getfield(L, idx, field);
  int ok;
  lua_Integer v = lua_tointegerx(L, -1, &ok);
  lua_pop(L, 1);
  if (!ok || v < lo || v > hi) luamp_raise(L, "Value", "bad shared object handle (field %s)", field);
  return v;
}

/* Takes one reference on a block named by a payload if it is still alive. */
static int block_acquire(block *b) {
  uint32_t r = atomic_load(&b->refs);
  for (;;) {
    if (!(r & REF_PIN) && (r & REF_COUNT) == 0) return 0;
    if ((r & REF_COUNT) == REF_COUNT) return 0;
    if (atomic_compare_exchange_weak(&b->refs, &r, r + 1)) return 1;
  }
}

static int block_is(struct luamp_arena *a, uint64_t off, unsigned type, size_t size, uint32_t gen) {
  block *b = block_at(a, off);
  unsigned cls = b->cls;
  return atomic_load(&b->tag) == (TAG_LIVE ^ type) && cls < NCLASS &&
         class_bytes(cls) <= a->size - off && class_bytes(cls) - BLOCK_HEADER >= size &&
         atomic_load(&b->next) == gen;
}

void *luamp_ref_attach(lua_State *L, luamp_ref *ref, int payload, unsigned type, size_t size) {
  payload = lua_absindex(L, payload);
  if (!lua_istable(L, payload)) luamp_raise(L, "Value", "bad shared object handle");
  lua_getfield(L, payload, "arena");
  const char *idhex = lua_tostring(L, -1);
  char id[33];
  if (!idhex || strlen(idhex) != 32) luamp_raise(L, "Value", "bad shared object handle (field arena)");
  memcpy(id, idhex, 33);
  lua_pop(L, 1);
  int carried = luamp_handle_is_carried(L, payload);
  pid_t pid = carried ? 0 : (pid_t)payload_int(L, payload, "pid", 1, INT32_MAX);
  int fd = carried ? -1 : (int)payload_int(L, payload, "fd", 0, INT32_MAX);
  uint64_t off = (uint64_t)payload_int(L, payload, "off", ARENA_HEADER, INT64_MAX);
  uint32_t gen = (uint32_t)payload_int(L, payload, "gen", 1, UINT32_MAX);
  pthread_once(&once, init_once);
  int myfd = -1;
  if (carried) {
    pthread_mutex_lock(&mu);
    int mapped = arena_find(id) != NULL;
    pthread_mutex_unlock(&mu);
    /* taken before locking: this raises when the descriptor did not come */
    if (!mapped) myfd = luamp_handle_recv_fd(L, payload, "fdi", "shared object");
  }
  pthread_mutex_lock(&mu);
  const char *why = NULL;
  struct luamp_arena *a = arena_find(id);
  if (!a && myfd >= 0) {
    a = arena_map_fd(myfd, id, &why);
    myfd = -1;
  } else if (!a && !carried) {
    a = arena_attach(pid, fd, id, &why);
  }
  if (myfd >= 0) luamp_close_fd(myfd);
  if (a) {
    if (off % 64 != 0 || off > a->size - BLOCK_HEADER) {
      why = "it points outside its arena";
    } else if (!block_is(a, off, type, size, gen)) {
      why = "it does not name a live object of this type (the object is gone)";
    } else {
      block *b = block_at(a, off);
      int got = carried && adopt_inflight(b);
      if (!got && (carried || (atomic_load(&b->refs) & REF_PIN))) got = block_acquire(b);
      if (!got) {
        why = "the object it names no longer exists";
      } else {
        ref_link(ref, a, off);
        if (!block_is(a, off, type, size, gen)) {   /* freed and reused meanwhile */
          ref_unlink(ref);
          drop(ref);
          ref->ptr = NULL;
          ref->arena = NULL;
          why = "the object it names no longer exists";
        }
      }
    }
  }
  pthread_mutex_unlock(&mu);
  if (why) luamp_raise(L, "Value", "cannot attach shared object: %s", why);
  return ref->ptr;
}

/* ---- Lua binding ---------------------------------------------------------------------- */

/* arena_stats() -> {live = blocks in use, used = bytes handed out so far, size = ...},
 * or nil before this process has an arena: lets tests see that objects are freed. */
static int l_arena_stats(lua_State *L) {
  pthread_mutex_lock(&mu);
  struct luamp_arena *a = current;
  uint64_t live = a ? atomic_load(&header_of(a)->live) : 0;
  uint64_t used = a ? atomic_load(&header_of(a)->bump) : 0;
  uint64_t size = a ? a->size : 0;
  pthread_mutex_unlock(&mu);
  if (!a) return 0;
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, (lua_Integer)live);
  lua_setfield(L, -2, "live");
  lua_pushinteger(L, (lua_Integer)used);
  lua_setfield(L, -2, "used");
  lua_pushinteger(L, (lua_Integer)size);
  lua_setfield(L, -2, "size");
  return 1;
}

int luamp_open_arena(lua_State *L) {
  pthread_once(&once, init_once);
  luamp_atfork(arena_fork_prepare, arena_fork_parent, arena_fork_child);
  luamp_atexit(arena_child_exit, LUAMP_AT_CHILD_EXIT);
  lua_pushcfunction(L, l_arena_stats);
  lua_setfield(L, -2, "arena_stats");
  return 0;
}
