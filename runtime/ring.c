/*
 * ring.c — the Pool's shared-memory channel between the parent and one worker
 * (lua/luamp/pool.lua): two single-producer single-consumer byte rings in one memfd, one
 * per direction (0: parent -> worker, tasks; 1: worker -> parent, results), each with an
 * eventfd as its doorbell.
 *
 * Why. A task and its result used to be one socket message each way, and the receiver
 * polled before each read: about three system calls per task, and a wake-up of the other
 * side for every message. Here a message is a record copied into the ring and published
 * by one store; no system call is made while the receiver is awake.
 *
 * Records. A record is a 32-bit length, a 32-bit tag (the Pool's: how many chunks a result
 * answers) and the bytes, padded to 8; positions are 64-bit
 * byte counters that only grow (head: consumed, tail: published), so tail - head is the
 * fill. A record that does not fit (with room left for MARKER_ROOM more markers) is not
 * written: a marker (length with MARKER set, the tag, no bytes) goes in its place and the caller
 * sends the message on the pool's socket, after the marker, so the receiver takes
 * messages from both paths in the producer's order. Messages carrying descriptors always
 * go by the socket (the caller decides). A marker always fits while fewer than
 * MARKER_ROOM messages are outstanding: the Pool holds a worker to fewer chunks than that
 * (it reads _core.ring_marker_room), each answered by one message at most.
 *
 * Whole records, few pages. A record never crosses the end of its area: a PAD header (the
 * rest of the area is unused) goes before one that would. So every record lies in one
 * piece and the consumer can decode it where it lies (ring:take_decoded: a big chunk's
 * million results go from the shared pages straight into the result table, with no
 * string, socket or copy between). And when the ring is empty, a record that fits before
 * the write offset goes back to the start of the area: a consumer that keeps up sees its
 * messages in the same few pages. The area is large (RING_CAP, so that a big chunk's
 * arguments or results fit) but costs only what is touched: the memfd's pages are made on
 * first touch, and the rewinding keeps what is touched to about the largest backlog.
 *
 * Waking. The consumer of a direction sets its `sleeping` word before it blocks (and looks
 * at the ring once more after setting it); the producer, after publishing, rings the
 * doorbell only if that word is set (and clears it). Both sides order the store before
 * the load with a full fence, so a record is never left unseen by a sleeping consumer.
 * The parent keeps its word set except while it is inside a pool wait: pumps run by
 * other waits and a host loop then still learn of results through the doorbell fd.
 *
 * Spinning. Before sleeping, a side may spin a little (spin_rings), for a budget per
 * direction that adapts as base.h's luamp_spin says: the producer stamps the moment it
 * rang the doorbell (`rang_at`), so the consumer judges a spin in vain by when the data
 * was published, not by when its sleep ended. On a loaded machine, where the peer is often
 * off its CPU and a long spin would rarely be rewarded (and takes a CPU the peer may
 * need), a side thus hardly spins; on an idle one the odd spin in vain (a collection, a
 * preemption) changes nothing (a back-off there made both sides fall asleep in turn: 45 us
 * per apply round trip instead of 24). So in a tight request/answer loop both sides are
 * still spinning when the next message comes (no doorbell, no sleep). A spin never lasts
 * longer than LUAMP_SPIN_MAX_NS, and a pending Ctrl-C ends it at once.
 *
 * Trust. The other side can write anything into the shared pages: every length and
 * position read from them is checked against the ring's size and fill before use; a ring
 * that makes no sense raises Value (the Pool then treats the worker as broken). Positions
 * and lengths are copied out of shared memory once before they are checked. A record
 * decoded in place is read by the codec, which checks every length against the record's
 * checked end as it goes: bytes changed under it can give a wrong value or a decode
 * error, never a read outside the record.
 *
 * Crossing. A ring made before a fork is inherited (MAP_SHARED mapping, CLOEXEC fds); a
 * spawn worker gets it as a luamp handle: the memfd and both eventfds travel with the
 * start message (handles.c).
 */

#include <stdatomic.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define RING_MT "luamp.PoolRing"
#define RING_MAGIC 0x676e6952706d6c00ULL   /* "\0lmpRing" */
#define RING_CAP (4u << 20)               /* bytes of each direction's data area */
#define HDR_SIZE 4096u
#define MARKER 0x80000000u
#define PAD 0xffffffffu                   /* the rest of the area up to its end is unused */
#define MARKER_ROOM 1024u                 /* markers that always fit after a record */
#define MAP_STEP (64u << 10)              /* bytes of a ring area mapped ahead at once */

typedef struct {
  _Alignas(64) _Atomic uint64_t tail;
  _Alignas(64) _Atomic uint64_t head;
  _Alignas(64) _Atomic uint32_t sleeping;
  _Atomic uint64_t rang_at;   /* when the producer last rang the doorbell (ns); a hint */
} ring_dir;

typedef struct {
  uint64_t magic;
  uint32_t cap;
  ring_dir d[2];
} ring_hdr;

typedef struct {
  ring_hdr *h;
  unsigned char *data[2];
  size_t maplen;
  int memfd;
  int efd[2];             /* doorbell of direction d, rung by its producer */
  luamp_spin spin[2];     /* this side's spinning when it waits on direction d */
  size_t mapped[2];       /* bytes of area d from its start whose pages this process has
                             mapped at once (see ring_map_ahead); 0 after a fork */
  pid_t mapped_by;        /* the process mapped[] belongs to */
  int decoding;           /* a record is being decoded where it lies (take_decoded) */
  int closing;            /* closed meanwhile: released when that decode ends */
} ring;

_Static_assert(sizeof(ring_hdr) <= HDR_SIZE, "ring header fits its page");

/* Every function of this file that takes a ring has the rings' metatable as upvalue 1:
 * comparing with it costs no registry lookup by name (luaL_checkudata's), on a path
 * taken several times per task. */
static ring *check_ring(lua_State *L, int idx) {
  ring *r = lua_touserdata(L, idx);
  int ours = r && lua_getmetatable(L, idx);
  if (ours) {
    ours = lua_rawequal(L, -1, lua_upvalueindex(1));
    lua_pop(L, 1);
  }
  if (!ours) luaL_typeerror(L, idx, RING_MT);
  if (!r->h) luamp_raise(L, "Value", "pool ring is closed");
  return r;
}

static int check_dir(lua_State *L, int idx) {
  lua_Integer d = luaL_checkinteger(L, idx);
  if (d != 0 && d != 1) luamp_raise(L, "Value", "ring direction must be 0 or 1");
  return (int)d;
}

static void ring_release(ring *r) {
  if (r->decoding) {        /* a finalizer closed it under a decode: that decode releases it */
    r->closing = 1;
    return;
  }
  if (r->h) munmap(r->h, r->maplen);
  r->h = NULL;
  luamp_close_fd(r->memfd);
  luamp_close_fd(r->efd[0]);
  luamp_close_fd(r->efd[1]);
  r->memfd = r->efd[0] = r->efd[1] = -1;
}

static ring *new_ring_ud(lua_State *L) {
  ring *r = lua_newuserdatauv(L, sizeof *r, 0);
  memset(r, 0, sizeof *r);
  r->memfd = r->efd[0] = r->efd[1] = -1;
  luamp_spin_init(&r->spin[0]);
  luamp_spin_init(&r->spin[1]);
  luaL_setmetatable(L, RING_MT);
  return r;
}

static int map_ring(ring *r) {
  r->maplen = HDR_SIZE + 2 * (size_t)RING_CAP;
  void *p = mmap(NULL, r->maplen, PROT_READ | PROT_WRITE, MAP_SHARED, r->memfd, 0);
  if (p == MAP_FAILED) return -1;
  r->h = p;
  r->data[0] = (unsigned char *)p + HDR_SIZE;
  r->data[1] = r->data[0] + RING_CAP;
  return 0;
}

/* ring_new() -> a ring, both doorbells quiet; the parent's word (direction 1) says
 * "sleeping" until it waits inside the pool. */
static int l_ring_new(lua_State *L) {
  ring *r = new_ring_ud(L);
  r->memfd = memfd_create("luamp-pool-ring", MFD_CLOEXEC);
  if (r->memfd < 0) luamp_raise_errno(L, "Value", "pool ring: memfd_create", errno);
  if (ftruncate(r->memfd, HDR_SIZE + 2 * (off_t)RING_CAP) < 0)
    luamp_raise_errno(L, "Value", "pool ring: ftruncate", errno);
  for (int d = 0; d < 2; d++) {
    r->efd[d] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->efd[d] < 0) luamp_raise_errno(L, "Value", "pool ring: eventfd", errno);
  }
  if (map_ring(r) < 0) luamp_raise_errno(L, "Value", "pool ring: mmap", errno);
  /* the first MAP_STEP of each area, where a ring whose reader keeps up writes every
   * record, is made and mapped now (as ring_map_ahead would on the first record): the
   * first message does not pay for fresh pages between its spin and its publishing
   * (15 new pages, 25 us and more under load: a waiter that spun then judged its spin
   * by a late message). A fork child maps them again (mapped_by), cheaply: they exist. */
  r->mapped_by = luamp_self_pid();
  for (int d = 0; d < 2; d++) {
    if (luamp_populate(r->data[d], MAP_STEP, 1) == 0) r->mapped[d] = MAP_STEP;
    else memset(r->data[d], 0, 4096);   /* (no populate: at least the first page) */
  }
  r->h->magic = RING_MAGIC;
  r->h->cap = RING_CAP;
  atomic_store(&r->h->d[1].sleeping, 1);
  return 1;
}

/* The fill of direction d, checked: -1 if the positions make no sense. */
static int64_t ring_fill(ring_dir *dd, uint64_t *head, uint64_t *tail) {
  *tail = atomic_load_explicit(&dd->tail, memory_order_acquire);
  *head = atomic_load_explicit(&dd->head, memory_order_relaxed);
  uint64_t fill = *tail - *head;
  if (fill > RING_CAP || (fill & 7) || (*head & 7)) return -1;
  return (int64_t)fill;
}

/* Records never cross the end of the area (a PAD goes before one that would): each lies
 * in one piece, so the consumer can decode it where it lies. */
static void copy_in(unsigned char *area, uint64_t pos, const void *src, size_t n) {
  memcpy(area + (size_t)(pos % RING_CAP), src, n);
}

static void copy_out(void *dst, const unsigned char *area, uint64_t pos, size_t n) {
  memcpy(dst, area + (size_t)(pos % RING_CAP), n);
}

/* Makes sure this process has the pages of area d under [off, off + len) mapped: the
 * bytes from the area's start up to r->mapped[d] are; past that, up to the end of the
 * range (at least MAP_STEP further, at most the area's end), are mapped with one madvise
 * (MADV_POPULATE_WRITE for the producer, _READ for the consumer, whose read of a page
 * the producer has not written yet makes it too). Why: the rings are memfd pages, made
 * on first touch and then faulted into each process one 4 KiB page at a time; on the
 * virtual machines this runs on a fault costs about 14 us, populating a page about 1.5 us
 * when it is new and 0.3 us when the other side made it (measured: 1024 pages, 14 ms by
 * faults, 1.8 ms / 0.3 ms by populate). A 1M map moved some 2,000 pages through its
 * rings. The rings are used from the start of each area up (see place), so one bound
 * per area says what is mapped. A fork child starts with none of its shared pages mapped:
 * the bound is this process's (mapped_by). Failure is harmless: the pages then come by
 * faults. */
static void ring_map_ahead(ring *r, int d, uint64_t off, uint64_t len, int write) {
  if (r->mapped_by != luamp_self_pid()) {
    r->mapped[0] = r->mapped[1] = 0;
    r->mapped_by = luamp_self_pid();
  }
  uint64_t end = off + len;
  if (end <= r->mapped[d]) return;
  uint64_t from = r->mapped[d] & ~(uint64_t)4095;
  uint64_t to = end > from + MAP_STEP ? end : from + MAP_STEP;
  to = (to + 4095) & ~(uint64_t)4095;
  if (to > RING_CAP) to = RING_CAP;
  /* (failed, the bound stays: the next record past it tries again, and on a kernel
   * without the advice luamp_populate returns at once) */
  if (luamp_populate(r->data[d] + from, to - from, write) == 0) r->mapped[d] = to;
}

static void ring_doorbell(ring *r, int d) {
  atomic_thread_fence(memory_order_seq_cst);
  if (atomic_load_explicit(&r->h->d[d].sleeping, memory_order_relaxed) &&
      atomic_exchange(&r->h->d[d].sleeping, 0)) {
    atomic_store_explicit(&r->h->d[d].rang_at, (uint64_t)luamp_mono_ns(), memory_order_relaxed);
    uint64_t one = 1;
    ssize_t w;
    do w = write(r->efd[d], &one, sizeof one); while (w < 0 && errno == EINTR);
    /* EAGAIN: the counter is full, so the doorbell is already ringing */
  }
}

/* Where the producer writes a record of `need` bytes (need > 0, a multiple of 8) with
 * `room` free and the area's write offset at `off`: returns the bytes of PAD to put first
 * (0: none), or -1 if it does not fit (with room kept for MARKER_ROOM markers after it).
 * A record never crosses the end of the area; and when the ring is empty a record that
 * fits before the offset starts again at the beginning, so a consumer that keeps up sees
 * its messages in the same few pages (a ring only touches what its largest backlog needs:
 * the memfd's pages are made on first touch). The pad counts as fill until the consumer
 * has passed it: after going back, only the bytes before the old offset are free, so
 * `follow` (bytes the caller is about to put right after this record) must fit there too,
 * or the record stays where it is. */
static int64_t place(uint64_t off, uint64_t need, uint64_t room, int empty, uint64_t follow) {
  uint64_t spare = 8u * MARKER_ROOM;
  uint64_t to_end = RING_CAP - off;
  if (off > 0 && (need > to_end || (empty && follow <= RING_CAP && need + follow + spare <= off))) {
    if (to_end + need + spare > room) return -1;
    return (int64_t)to_end;
  }
  return need + spare <= room ? 0 : -1;
}

/* Puts len bytes at s (or a marker: want_marker, or when they do not fit) into direction
 * d; whether the bytes went in. Raises Value when not even a marker fits. */
static int put_bytes(lua_State *L, ring *r, int d, const char *s, size_t len, int want_marker,
                     lua_Integer tag, lua_Integer follow) {
  ring_dir *dd = &r->h->d[d];
  /* the producer owns tail: its own copy is trusted, head is the consumer's */
  uint64_t tail = atomic_load_explicit(&dd->tail, memory_order_relaxed);
  uint64_t head = atomic_load_explicit(&dd->head, memory_order_acquire);
  uint64_t fill = tail - head;
  if (fill > RING_CAP || (tail & 7))
    luamp_raise(L, "Value", "pool ring: the reader's position is garbled");
  uint64_t room = RING_CAP - fill;
  if (tag < 0 || tag > UINT32_MAX) luamp_raise(L, "Value", "ring tag out of range");
  if (follow < 0) luamp_raise(L, "Value", "ring: follow must not be negative");
  uint64_t need = 8 + (uint64_t)len;
  need = (need + 7) & ~(uint64_t)7;
  int64_t pad = -1;
  if (!want_marker && len < MARKER)
    pad = place(tail % RING_CAP, need, room, fill == 0, (uint64_t)follow);
  uint32_t hdr[2] = {(uint32_t)len, (uint32_t)tag};
  if (pad >= 0) {
    ring_map_ahead(r, d, (tail + (uint64_t)pad) % RING_CAP, need, 1);
    if (pad > 0) {
      uint32_t ph[2] = {PAD, 0};
      copy_in(r->data[d], tail, ph, 8);
      tail += (uint64_t)pad;
    }
    copy_in(r->data[d], tail, hdr, 8);
    copy_in(r->data[d], tail + 8, s, len);
  } else {
    if (room < 8) luamp_raise(L, "Value", "pool ring is full");
    hdr[0] = MARKER;
    copy_in(r->data[d], tail, hdr, 8);
    need = 8;
  }
  atomic_store_explicit(&dd->tail, tail + need, memory_order_release);
  ring_doorbell(r, d);
  return pad >= 0;
}

/* ring:put(d, bytes, [marker], [tag], [follow]) -> true (in the ring), or false (a marker
 * went in its place: send the message on the socket now; marker = true asks for one).
 * tag: a 32-bit number that travels with the record (0 by default). follow: how many
 * bytes of records the caller puts right after this one (see place). Raises Value if not
 * even a marker fits. */
static int l_put(lua_State *L) {
  ring *r = check_ring(L, 1);
  int d = check_dir(L, 2);
  size_t len;
  const char *s = luaL_checklstring(L, 3, &len);
  lua_pushboolean(L, put_bytes(L, r, d, s, len, lua_toboolean(L, 4), luaL_optinteger(L, 5, 0),
                               luaL_optinteger(L, 6, 0)));
  return 1;
}

/* ring:put_value(d, v, [tag], [t, i, j]) -> true: v encoded as _core.dumpx(v, nil, t, i, j)
 * would, straight into the ring (no string is made); or false, bytes, [fds]: a marker
 * went in its place (v too big for the ring, or it needs descriptors): send bytes (and
 * fds) on the socket now. Raises what dumpx raises; then nothing was put. */
static int l_put_value(lua_State *L) {
  ring *r = check_ring(L, 1);
  int d = check_dir(L, 2);
  luaL_checkany(L, 3);
  lua_Integer tag = luaL_optinteger(L, 4, 0);
  /* the caller holds the ring: it stays alive without a stack slot */
  lua_settop(L, 7);
  lua_remove(L, 4);
  lua_remove(L, 1);
  lua_remove(L, 1);                       /* v, t, i, j */
  lua_pushnil(L);
  lua_rotate(L, 2, 1);                    /* v, nil (root), t, i, j */
  const char *data;
  size_t len;
  int nfds = luamp_dumpx_scratch(L, &data, &len);
  if (!r->h) luamp_raise(L, "Value", "pool ring is closed");   /* (by a hook meanwhile) */
  if (put_bytes(L, r, d, data, len, nfds > 0, tag, 0)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushboolean(L, 0);
  lua_pushlstring(L, data, len);
  if (nfds == 0) return 2;
  return 2 + luamp_dumpx_push_fds(L);
}

/* ring:put_args(d, pre, t, i, j) -> pre_in_ring, len, [bytes, [fds]]: the message pre,
 * then the list {t[i], ..., t[j]} encoded as _core.dumpx(t, nil, t, i, j) would (len
 * bytes), straight into the ring after it (no string is made: a Pool's big chunk of a
 * map, whose arguments are encoded when they are sent). The list is encoded first: when
 * that raises (what dumpx raises), nothing was put. pre_in_ring false: a marker went in
 * pre's place, send pre on the socket now; bytes (and fds): the list went the same way,
 * send them on the socket after pre. The caller holds pre (as it holds the ring): it
 * stays alive without a stack slot. */
static int l_put_args(lua_State *L) {
  ring *r = check_ring(L, 1);
  int d = check_dir(L, 2);
  size_t plen;
  const char *pre = luaL_checklstring(L, 3, &plen);
  luaL_checktype(L, 4, LUA_TTABLE);
  luaL_checkinteger(L, 5);
  luaL_checkinteger(L, 6);
  lua_settop(L, 6);
  lua_remove(L, 1);
  lua_remove(L, 1);
  lua_remove(L, 1);                       /* t, i, j */
  lua_pushvalue(L, 1);
  lua_insert(L, 1);
  lua_pushnil(L);
  lua_insert(L, 2);                       /* t (the value), nil (root), t, i, j */
  const char *data;
  size_t len;
  int nfds = luamp_dumpx_scratch(L, &data, &len);
  if (!r->h) luamp_raise(L, "Value", "pool ring is closed");   /* (by a hook meanwhile) */
  int pre_in = put_bytes(L, r, d, pre, plen, 0, 0, (lua_Integer)len + 16);
  int in = put_bytes(L, r, d, data, len, nfds > 0, 0, 0);
  lua_pushboolean(L, pre_in);
  lua_pushinteger(L, (lua_Integer)len);
  if (in) return 2;
  lua_pushlstring(L, data, len);
  if (nfds == 0) return 3;
  return 3 + luamp_dumpx_push_fds(L);
}

static int garbled(lua_State *L, const char *why) {
  lua_pushnil(L);
  lua_pushfstring(L, "pool ring: %s", why);
  return 2;
}

enum { REC_EMPTY, REC_MARKER, REC_DATA, REC_GARBLED };

/* The next record of direction d, PADs before it passed over: its kind; for REC_DATA its
 * bytes' place and length, for REC_DATA and REC_MARKER its tag and where it starts (head)
 * and the bytes it takes (consuming it stores head + used, which moves past the PADs
 * too); for REC_GARBLED why. Nothing is stored here: empty or garbled, the position stays
 * where it was. Everything read from the shared pages is copied out once, then checked. */
static int next_record(ring *r, int d, uint64_t *head, uint32_t *len, uint32_t *tag,
                       uint64_t *used, const char **why) {
  ring_dir *dd = &r->h->d[d];
  uint64_t tail;
  int64_t fill = ring_fill(dd, head, &tail);
  if (fill < 0) { *why = "positions are garbled"; return REC_GARBLED; }
  for (;;) {
    if (fill == 0) return REC_EMPTY;
    if (fill < 8) { *why = "a record is cut short"; return REC_GARBLED; }
    uint32_t hdr[2];
    ring_map_ahead(r, d, *head % RING_CAP, 8, 0);
    copy_out(hdr, r->data[d], *head, 8);
    if (hdr[0] == PAD) {
      uint64_t skip = RING_CAP - *head % RING_CAP;
      if (skip > (uint64_t)fill) { *why = "a pad is longer than the ring holds"; return REC_GARBLED; }
      *head += skip;
      fill -= (int64_t)skip;
      continue;
    }
    *tag = hdr[1];
    if (hdr[0] == MARKER) {
      *used = 8;
      return REC_MARKER;
    }
    if (hdr[0] & MARKER) { *why = "a record has a garbled length"; return REC_GARBLED; }
    *used = (8 + (uint64_t)hdr[0] + 7) & ~(uint64_t)7;
    if (*used > (uint64_t)fill) { *why = "a record is longer than the ring holds"; return REC_GARBLED; }
    if (*head % RING_CAP + *used > RING_CAP) {
      *why = "a record crosses the end of the ring";
      return REC_GARBLED;
    }
    *len = hdr[0];
    ring_map_ahead(r, d, *head % RING_CAP, *used, 0);
    return REC_DATA;
  }
}

/* next_record for a take: whatever it finds after a spin in vain judges that spin. */
static int take_record(ring *r, int d, uint64_t *head, uint32_t *len, uint32_t *tag,
                       uint64_t *used, const char **why) {
  int kind = next_record(r, d, head, len, tag, used, why);
  if (kind != REC_EMPTY && r->spin[d].gave_up > 0)   /* judges the last spin, in vain */
    luamp_spin_late(&r->spin[d],
                    (double)atomic_load_explicit(&r->h->d[d].rang_at, memory_order_relaxed));
  return kind;
}

/* ring:take(d) -> the next message's bytes and its tag, false and the tag (a marker: the
 * next message is on the socket), or nil (empty); nil, message if the ring is garbled. */
static int l_take(lua_State *L) {
  ring *r = check_ring(L, 1);
  int d = check_dir(L, 2);
  uint64_t head, used = 0;
  uint32_t len = 0, tag = 0;
  const char *why = NULL;
  int kind = take_record(r, d, &head, &len, &tag, &used, &why);
  switch (kind) {
    case REC_EMPTY: lua_pushnil(L); return 1;
    case REC_GARBLED: return garbled(L, why);
    case REC_MARKER: lua_pushboolean(L, 0); break;
    default:   /* a record is in one piece: copied straight into the string */
      lua_pushlstring(L, (const char *)r->data[d] + (head + 8) % RING_CAP, len);
  }
  lua_pushinteger(L, tag);
  atomic_store_explicit(&r->h->d[d].head, head + used, memory_order_release);
  return 2;
}

/* ring:take_decoded(d, [dst, pos, n, at]) -> as take, but a message comes decoded
 * (trusted: the ring joins luamp's own processes) where it lies in the shared pages,
 * without a copy: the value, its tag and true; with dst, as _core.loads_into(bytes, dst, pos,
 * n, at) (a big chunk's results go straight into the result table). A record that does
 * not decode is consumed and reported as garbled (nil, message); a Ctrl-C met while
 * decoding is raised once the record is consumed. */
static int l_take_decoded(lua_State *L) {
  ring *r = check_ring(L, 1);
  int d = check_dir(L, 2);
  int into = !lua_isnoneornil(L, 3);
  lua_Integer pos = 0, n = 0, at = 0;
  if (into) {
    luaL_checktype(L, 3, LUA_TTABLE);
    pos = luaL_checkinteger(L, 4);
    n = luaL_checkinteger(L, 5);
    at = luaL_optinteger(L, 6, 0);
    if (n < 0 || pos < 1 || pos > LUA_MAXINTEGER - n || at < 0)
      luamp_raise(L, "Value", "take_decoded: bad position or count");
  }
  lua_settop(L, 6);
  uint64_t head, used = 0;
  uint32_t len = 0, tag = 0;
  const char *why = NULL;
  int kind = take_record(r, d, &head, &len, &tag, &used, &why);
  switch (kind) {
    case REC_EMPTY: lua_pushnil(L); return 1;
    case REC_GARBLED: return garbled(L, why);
    case REC_MARKER:
      atomic_store_explicit(&r->h->d[d].head, head + used, memory_order_release);
      lua_pushboolean(L, 0);
      lua_pushinteger(L, tag);
      return 2;
    default: break;
  }
  const char *p = (const char *)r->data[d] + head % RING_CAP + 8;
  /* the record stays where it is (head not moved) until it is decoded: the producer
   * writes only past tail; a finalizer that closes the ring meanwhile defers its unmap */
  r->decoding = 1;
  int rc = into ? luamp_decode_into(L, p, len, 3, pos, n, at)
                : luamp_decodex(L, p, len, 0) == 0 ? 1 : -1;
  r->decoding = 0;
  if (r->closing) {
    ring_release(r);
  } else {
    atomic_store_explicit(&r->h->d[d].head, head + used, memory_order_release);
  }
  if (rc < 0) {
    if (luamp_is_interrupted(L, -1)) return lua_error(L);
    const char *msg = luamp_push_error_text(L, -1);     /* the codec's error object */
    lua_pushnil(L);
    lua_pushfstring(L, "pool ring: a record does not decode: %s", msg);
    return 2;
  }
  if (rc == 0) lua_pushboolean(L, 1);   /* loads_into without at: nothing to give back */
  lua_pushinteger(L, tag);
  lua_pushboolean(L, 1);                /* (a decoded false or nil is told from a marker) */
  return 3;
}

/* ring:has(d) -> whether direction d holds a message (or garbled positions: the take
 * that follows reports them). */
static int l_has(lua_State *L) {
  ring *r = check_ring(L, 1);
  int d = check_dir(L, 2);
  ring_dir *dd = &r->h->d[d];
  lua_pushboolean(L, atomic_load_explicit(&dd->tail, memory_order_acquire) !=
                     atomic_load_explicit(&dd->head, memory_order_relaxed));
  return 1;
}

/* ring:set_sleeping(d, on) -> whether direction d holds a message now, and whether the
 * word was set before. A consumer about to block sets it (and must not block if this
 * returns true); one that is awake clears it, so producers skip the doorbell (a word
 * found cleared after a sleep means the doorbell was rung). */
static int l_set_sleeping(lua_State *L) {
  ring *r = check_ring(L, 1);
  int d = check_dir(L, 2);
  int on = lua_toboolean(L, 3);
  ring_dir *dd = &r->h->d[d];
  uint32_t was = atomic_exchange(&dd->sleeping, on ? 1u : 0u);
  atomic_thread_fence(memory_order_seq_cst);
  lua_pushboolean(L, atomic_load_explicit(&dd->tail, memory_order_acquire) !=
                     atomic_load_explicit(&dd->head, memory_order_relaxed));
  lua_pushboolean(L, was != 0);
  return 2;
}

/* ring:peer_awake(d) -> whether the consumer of direction d is awake (its word clear). */
static int l_peer_awake(lua_State *L) {
  ring *r = check_ring(L, 1);
  int d = check_dir(L, 2);
  lua_pushboolean(L, atomic_load_explicit(&r->h->d[d].sleeping, memory_order_relaxed) == 0);
  return 1;
}

/* ring:kick(d): rings direction d's doorbell (a consumer that found messages it will
 * not take now leaves them announced for whichever wait comes next). */
static int l_kick(lua_State *L) {
  ring *r = check_ring(L, 1);
  int d = check_dir(L, 2);
  uint64_t one = 1;
  ssize_t w;
  do w = write(r->efd[d], &one, sizeof one); while (w < 0 && errno == EINTR);
  return 0;
}

/* ring:clear_doorbell(d): takes the doorbell's count (no system call is saved by
 * skipping it: only called when its fd was seen readable). */
static int l_clear_doorbell(lua_State *L) {
  ring *r = check_ring(L, 1);
  int d = check_dir(L, 2);
  uint64_t v;
  ssize_t n;
  do n = read(r->efd[d], &v, sizeof v); while (n < 0 && errno == EINTR);
  return 0;
}

static int ring_nonempty(ring *r, int d) {
  ring_dir *dd = &r->h->d[d];
  return atomic_load_explicit(&dd->tail, memory_order_acquire) !=
         atomic_load_explicit(&dd->head, memory_order_relaxed);
}

/* spin_rings(d, limit_s, ring...) -> the first ring whose direction d got a message
 * while spinning, or nil. Spins at most the smallest budget of the rings (adaptive, see
 * the header) and never past limit_s seconds (nil: no limit). A pending Ctrl-C ends it
 * at once (the wait that follows reports it). */
static int l_spin_rings(lua_State *L) {
  int d = check_dir(L, 1);
  double limit = luaL_optnumber(L, 2, -1);
  int top = lua_gettop(L);
  if (top < 3) return 0;
  ring *rs[64];
  int n = 0;
  double budget = LUAMP_SPIN_MAX_NS;
  for (int i = 3; i <= top && n < 64; i++) {
    ring *r = check_ring(L, i);
    if (ring_nonempty(r, d)) { lua_pushvalue(L, i); return 1; }
    rs[n++] = r;
    double b = luamp_spin_budget(&r->spin[d]);
    if (b < budget) budget = b;
  }
  if (limit >= 0 && limit * 1e9 < budget) budget = limit * 1e9;
  if (budget < LUAMP_SPIN_MIN_NS / 2 || luamp_interrupt_pending()) return 0;
  double t0 = luamp_mono_ns(), t = t0;
  unsigned rounds = 0;
  while (t - t0 < budget) {
    for (int i = 0; i < n; i++) {
      if (ring_nonempty(rs[i], d)) {
        for (int k = 0; k < n; k++) luamp_spin_caught(&rs[k]->spin[d], t - t0, budget);
        lua_pushvalue(L, 3 + i);
        return 1;
      }
    }
    for (int k = 0; k < 8; k++) luamp_cpu_relax();
    if ((++rounds & 7) == 0) {
      if (luamp_interrupt_pending()) break;
      t = luamp_mono_ns();
    }
  }
  /* (data that came while this side was off the CPU is still taken) */
  for (int i = 0; i < n; i++) {
    if (ring_nonempty(rs[i], d)) { lua_pushvalue(L, 3 + i); return 1; }
  }
  /* in vain: the next take that finds data judges the budget (take_record) */
  for (int k = 0; k < n; k++) luamp_spin_in_vain(&rs[k]->spin[d], t0, budget);
  return 0;
}

/* ring:spin_budget(d) -> the spin (seconds) this side would afford now waiting on
 * direction d (for the specs: the policy of the header, observed without timing). */
static int l_spin_budget(lua_State *L) {
  ring *r = check_ring(L, 1);
  lua_pushnumber(L, luamp_spin_budget(&r->spin[check_dir(L, 2)]) / 1e9);
  return 1;
}

/* ring:doorbell_fd(d) -> the eventfd a consumer of direction d waits on */
static int l_doorbell_fd(lua_State *L) {
  ring *r = check_ring(L, 1);
  lua_pushinteger(L, r->efd[check_dir(L, 2)]);
  return 1;
}

static int l_close(lua_State *L) {
  ring_release(luaL_checkudata(L, 1, RING_MT));
  return 0;
}

static void push_identity_key(lua_State *L, const struct stat *st) {
  lua_pushfstring(L, "PoolRing %I:%I", (lua_Integer)st->st_dev, (lua_Integer)st->st_ino);
}

/* __luamp_handle: only with its descriptors (a spawn worker's start message); a ring is
 * never sent any other way. */
static int l_handle(lua_State *L) {
  ring *r = check_ring(L, 1);
  int fm = luamp_handle_send_fd(L, r->memfd);
  if (fm < 0) luamp_raise(L, "Serialize", "a pool ring only crosses with its descriptors");
  int f0 = luamp_handle_send_fd(L, r->efd[0]);
  int f1 = luamp_handle_send_fd(L, r->efd[1]);
  lua_pushliteral(L, RING_MT);
  lua_createtable(L, 0, 4);
  lua_pushboolean(L, 1);
  lua_setfield(L, -2, "carried");
  lua_pushinteger(L, fm);
  lua_setfield(L, -2, "fdi");
  lua_pushinteger(L, f0);
  lua_setfield(L, -2, "e0");
  lua_pushinteger(L, f1);
  lua_setfield(L, -2, "e1");
  return 2;
}

static int l_from_handle(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  if (!luamp_handle_is_carried(L, 1))
    luamp_raise(L, "Value", "a pool ring came without its descriptors");
  ring *r = new_ring_ud(L);             /* owns the descriptors from here on */
  r->memfd = luamp_handle_recv_fd(L, 1, "fdi", "pool ring");
  r->efd[0] = luamp_handle_recv_fd(L, 1, "e0", "pool ring");
  r->efd[1] = luamp_handle_recv_fd(L, 1, "e1", "pool ring");
  struct stat st;
  if (fstat(r->memfd, &st) < 0 || !S_ISREG(st.st_mode) ||
      st.st_size != (off_t)(HDR_SIZE + 2 * (off_t)RING_CAP))
    luamp_raise(L, "Value", "cannot receive a pool ring: its memory is not the right size");
  if (map_ring(r) < 0) luamp_raise_errno(L, "Value", "pool ring: mmap", errno);
  if (r->h->magic != RING_MAGIC || r->h->cap != RING_CAP)
    luamp_raise(L, "Value", "cannot receive a pool ring: not a pool ring");
  push_identity_key(L, &st);
  luamp_handle_remember(L, -2, lua_tostring(L, -1));
  lua_pop(L, 1);
  return 1;
}

static int l_gc(lua_State *L) {
  ring_release(luaL_checkudata(L, 1, RING_MT));
  return 0;
}

int luamp_open_ring(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"put", l_put},
    {"put_value", l_put_value},
    {"put_args", l_put_args},
    {"take", l_take},
    {"take_decoded", l_take_decoded},
    {"has", l_has},
    {"set_sleeping", l_set_sleeping},
    {"peer_awake", l_peer_awake},
    {"clear_doorbell", l_clear_doorbell},
    {"kick", l_kick},
    {"doorbell_fd", l_doorbell_fd},
    {"spin_budget", l_spin_budget},
    {"close", l_close},
    {NULL, NULL}
  };
  static const luaL_Reg meta[] = {
    {"__gc", l_gc},
    {"__close", l_gc},
    {"__luamp_handle", l_handle},
    {NULL, NULL}
  };
  static const luaL_Reg fns[] = {
    {"ring_new", l_ring_new},
    {"spin_rings", l_spin_rings},
    {NULL, NULL}
  };
  if (luaL_newmetatable(L, RING_MT)) {
    lua_pushvalue(L, -1);
    luaL_setfuncs(L, meta, 1);
    luaL_newlibtable(L, methods);
    lua_pushvalue(L, -2);
    luaL_setfuncs(L, methods, 1);
    lua_setfield(L, -2, "__index");
  }
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUAMP_HANDLES_KEY);
  lua_pushcfunction(L, l_from_handle);
  lua_setfield(L, -2, RING_MT);
  lua_pop(L, 1);
  luaL_setfuncs(L, fns, 1);   /* (the metatable, left on the stack, is their upvalue) */
  lua_pushinteger(L, MARKER_ROOM);
  lua_setfield(L, -2, "ring_marker_room");
  return 0;
}
