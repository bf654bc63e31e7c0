/*
 * connection.c — Connection objects: the two ends of luamp.Pipe().
 *
 * A Pipe is an AF_UNIX SOCK_SEQPACKET socketpair. A message is a frame (an 8-byte
 * little-endian length, then the payload) cut into records of at most CHUNK bytes, the
 * first record holding the length. Records keep their boundaries, so a small message
 * arrives with one recv, and a reader never takes bytes beyond the message it asked for:
 * several processes may share one end (taking turns under a lock), as in Python. A larger
 * message is received record by record straight into its buffer, which grows as the
 * records arrive: the length in a frame is the peer's claim, and a claim alone never
 * makes the receiver allocate (beyond RX_AHEAD). Records of one message
 * are consecutive unless two processes send on the same end at once (Python forbids that
 * too); a small message is a single record and is never torn.
 *
 * Neither side can deadlock two processes that send large messages to each other at
 * once: while the socket is full, a duplex end drains what its peer sent into a local
 * buffer (rbuf), so both sides make progress. A receive reads rbuf before the socket.
 *
 * Every wait goes through luamp_wait_fds. A receive cut short (Ctrl-C) in the middle of a
 * message keeps what it has, and the next receive resumes it. A send cut short in the
 * middle of a message leaves the peer with half a frame: the end shuts down its sending
 * side (the peer then sees EOF) and later sends raise BrokenPipe.
 *
 * recv_bytes(maxlength) on a longer message reads and discards that message, raises
 * Value, and leaves the connection usable. Anything a peer sends is checked: a frame
 * that does not parse raises Value and marks the receiving side broken.
 *
 * Descriptors (handles.c): a message whose value holds luamp objects carries their
 * descriptors as SCM_RIGHTS on its first record, and the top byte of the frame's length
 * word says how many (0 for every other message, whose bytes are unchanged). Records
 * drained into rbuf keep their descriptors in a FIFO (stash), from which a frame read
 * out of rbuf takes as many as its header says. Received descriptors belong to the
 * message until it is decoded; whatever the decoding does not take is closed.
 *
 * Spinning. A request and its answer cross a Pipe in a few microseconds of work, but a
 * receiver that sleeps in the kernel pays for its wake-up (about 10 us per direction on
 * a VM, where an idle CPU must be woken first). So the two ends of a Pipe share one page
 * of hints (MAP_SHARED, inherited by fork): per direction, how many messages were sent
 * (`sent`, bumped after a message's first record went out; `rang_at`, the sender's
 * monotonic clock just before it went) and how many receives began (`taken`). A receive
 * with nothing there spins a little on that page, without a system call, before it
 * blocks: `sent` moving past `taken` means a record is in the socket. The budget adapts
 * as base.h's luamp_spin says (as the Pool's rings' does), a spin in vain judged by
 * `rang_at`, not by when the sleep ended. So in a ping-pong both ends are still spinning
 * when the answer comes, and a Pipe that is idle or slow costs at most
 * LUAMP_SPIN_MIN_NS per receive. The page is a hint only: every receive is still a real
 * recvmsg, and receives running ahead of the messages counted (an end that came as a
 * handle has no page and counts nothing) end the spinning of that end for good. A spin
 * happens only in a plain wait (no task scheduler, no pump: inside luamp.run a wait
 * suspends its task instead), never longer than LUAMP_SPIN_MAX_NS or the deadline, and a
 * pending Ctrl-C ends it at once.
 */
#include <fcntl.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define CONN_MT "luamp.Connection"
#define CHUNK (64 * 1024)            /* record size: well under the default socket buffer */
#define HDR 8
#define MAX_MESSAGE ((uint64_t)1 << 42)   /* a larger length can only be garbage */
#define KEEP_BUFFER (1024 * 1024)
#define SOCKET_BUFFER (1024 * 1024)    /* larger receive buffers are freed after use */
#define POPULATE_MIN (256 * 1024)   /* the first step of populating a receive buffer */
#define RX_AHEAD (8 * 1024 * 1024)   /* receive buffer allocated ahead of a message's data */
#define HUGE_PAGE ((size_t)2 << 20)
#define HUGE ((size_t)4 << 20)     /* receive buffers this large use huge pages */
#define FDS_SHIFT 56                   /* frame length word: descriptor count in the top byte */
#define LEN_MASK (((uint64_t)1 << FDS_SHIFT) - 1)
#define CMSG_ROOM CMSG_SPACE(sizeof(int) * LUAMP_MAX_FDS)
#define HINT_PAGE 4096
#define UNANNOUNCED_MAX 16             /* receives ahead of the sends counted: no more spins */

/* One direction of a Pipe's shared hint page (see the header): written by any process
 * holding either end, so only ever a hint. */
typedef struct {
  _Alignas(64) _Atomic uint64_t sent;     /* messages whose first record went out */
  _Atomic uint64_t rang_at;               /* monotonic ns of the last bump of sent */
  _Alignas(64) _Atomic uint64_t taken;    /* receives that began */
} hint_dir;

typedef struct { hint_dir d[2]; } pipe_hints;
_Static_assert(sizeof(pipe_hints) <= HINT_PAGE, "the hints fit their page");

typedef struct conn {
  int fd;                 /* -1 once closed */
  int readable, writable;
  int tx_broken;          /* a send stopped mid-message: the stream is no longer framed */
  int rx_broken;          /* the peer sent something that is not a frame */
  unsigned waited;        /* receives in a row that found the socket empty (see rx_start) */
  int sliced;             /* SO_RCVTIMEO is LUAMP_WAIT_SLICE: 1 set, -1 could not be, 0 not yet */
  char *scratch;          /* CHUNK bytes: first records, discarded data */
  /* records drained from the socket while a send waited, not yet received */
  char *rbuf;
  size_t rbuf_pos, rbuf_len, rbuf_cap;
  /* the message being received, kept across an interrupted receive */
  int rx_active, rx_discard;
  uint64_t rx_total, rx_got;
  char *rx_buf;           /* rx_cap bytes from rx_reserve */
  size_t rx_cap;
  size_t rx_ready;        /* bytes of rx_buf populated */
  luamp_buf tx;           /* encoded message being sent, reused */
  uint64_t dropped;       /* length of the message a failed receive discarded */
  uint64_t cut_got, cut_total;   /* a message the peer stopped sending midway (T_CUT) */
  luamp_fdlist rx_fds;    /* descriptors that came with the message being received */
  int *stash;             /* descriptors of records drained into rbuf, oldest first */
  size_t stash_pos, stash_len, stash_cap;
  /* spinning before a receive blocks (see the header) */
  pipe_hints *hints;      /* this end's own mapping of the Pipe's page, or NULL */
  int dir;                /* the direction this end sends on; it receives on !dir */
  int hints_broken;       /* a message came that the page never announced: no more spins */
  luamp_spin spin;        /* the budget and its back-off */
} conn;

/* Outcomes of the transfer helpers; the Lua-facing functions turn them into errors
 * only after every buffer the helper used is back in the connection's hands. */
enum { T_OK = 0, T_TIMEOUT, T_INTR, T_EOF, T_CUT, T_PIPE, T_CORRUPT, T_TOOLONG, T_NOMEM, T_SYS };

static void put_le64(unsigned char *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_le64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
  return v;
}

static size_t rbuf_avail(const conn *c) { return c->rbuf_len - c->rbuf_pos; }

static void rbuf_take(conn *c, void *dst, size_t n) {
  if (dst) memcpy(dst, c->rbuf + c->rbuf_pos, n);
  c->rbuf_pos += n;
  if (c->rbuf_pos == c->rbuf_len) c->rbuf_pos = c->rbuf_len = 0;
}

/* Keeps the SCM_RIGHTS descriptors of a received message header in `to` (up to its room;
 * any others are closed), or appends them to the stash when `to` is NULL. */
static void take_cmsg_fds(conn *c, struct msghdr *msg, luamp_fdlist *to) {
  for (struct cmsghdr *cm = CMSG_FIRSTHDR(msg); cm; cm = CMSG_NXTHDR(msg, cm)) {
    if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
    size_t n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < n; i++) {
      int fd;
      memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
      if (to) {
        if (to->n < LUAMP_MAX_FDS) to->fd[to->n++] = fd;
        else luamp_close_fd(fd);
        continue;
      }
      if (c->stash_len == c->stash_cap) {
        size_t cap = c->stash_cap ? c->stash_cap * 2 : 16;
        int *p = realloc(c->stash, cap * sizeof *p);
        if (!p) { luamp_close_fd(fd); continue; }
        c->stash = p;
        c->stash_cap = cap;
      }
      c->stash[c->stash_len++] = fd;
    }
  }
}

/* Moves n stashed descriptors (those of a frame read from rbuf) to rx_fds. */
static void unstash(conn *c, unsigned n) {
  for (unsigned i = 0; i < n && c->stash_pos < c->stash_len; i++) {
    int fd = c->stash[c->stash_pos++];
    if (c->rx_fds.n < LUAMP_MAX_FDS) c->rx_fds.fd[c->rx_fds.n++] = fd;
    else luamp_close_fd(fd);
  }
  if (c->stash_pos == c->stash_len) c->stash_pos = c->stash_len = 0;
}

static void stash_close(conn *c) {
  for (size_t i = c->stash_pos; i < c->stash_len; i++) luamp_close_fd(c->stash[i]);
  free(c->stash);
  c->stash = NULL;
  c->stash_pos = c->stash_len = c->stash_cap = 0;
}

/* Receive buffers are mapped directly and populated in one call: on this kind of machine
 * (virtualised page tables) taking a page fault per 4 KiB costs more than the copy.
 * One buffer of up to KEEP_BUFFER bytes stays for the next message. */
static void rx_release(conn *c, int keep) {
  if (!c->rx_buf || (keep && c->rx_cap <= KEEP_BUFFER)) return;
  munmap(c->rx_buf, c->rx_cap);
  c->rx_buf = NULL;
  c->rx_cap = 0;
}

/* Maps cap bytes for a receive buffer, moving the `old` bytes populated at `from` (if
 * any) to its start. A buffer of HUGE bytes or more starts at a huge-page boundary and
 * asks for huge pages, which makes populating and copying it markedly cheaper: mremap
 * alone would put it wherever there is room, and an unaligned range gets none. */
static void *rx_map(void *from, size_t old, size_t cap) {
  int flags = MAP_PRIVATE | MAP_ANONYMOUS;
  if (cap < HUGE) {
    return from ? mremap(from, old, cap, MREMAP_MAYMOVE)
                : mmap(NULL, cap, PROT_READ | PROT_WRITE, flags, -1, 0);
  }
  size_t span = cap + HUGE_PAGE;
  char *r = mmap(NULL, span, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (r == MAP_FAILED) return r;
  char *a = (char *)(((uintptr_t)r + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
  if (a > r) munmap(r, (size_t)(a - r));
  if (a + cap < r + span) munmap(a + cap, (size_t)(r + span - (a + cap)));
  if (from && mremap(from, old, old, MREMAP_MAYMOVE | MREMAP_FIXED, a) == MAP_FAILED) {
    munmap(a, cap);
    return MAP_FAILED;
  }
#ifdef MADV_HUGEPAGE
  madvise(a, cap, MADV_HUGEPAGE);
#endif
  return a;
}

/* Populates the buffer up to at least `need` bytes, in steps that double with the data
 * received, so a claim never makes us touch more than about twice what arrived. */
static void rx_populate(conn *c, size_t need) {
  if (need <= c->rx_ready) return;
  size_t upto = c->rx_ready * 2;
  if (upto < POPULATE_MIN) upto = POPULATE_MIN;
  if (upto < need) upto = need;
  if (upto > c->rx_cap) upto = c->rx_cap;
  size_t from = c->rx_ready & ~(size_t)4095;
#ifdef MADV_POPULATE_WRITE
  madvise(c->rx_buf + from, upto - from, MADV_POPULATE_WRITE);
#endif
  c->rx_ready = upto;
}

/* Makes room for the first `need` bytes of the message being received (need <= rx_total).
 * The length in a frame is only the peer's claim, so the buffer is not sized by it: it
 * is mapped RX_AHEAD bytes at first (address space only) and doubles as data arrives
 * (the pages already populated are moved, not copied), never beyond the claimed length;
 * pages are populated as the data reaches them. What is mapped is thus at most RX_AHEAD
 * or about twice what has arrived, what is touched about twice what has arrived. */
static int rx_reserve(conn *c, uint64_t need) {
  if (c->rx_buf && c->rx_cap >= need) {
    rx_populate(c, (size_t)need);
    return 0;
  }
  uint64_t want = (uint64_t)c->rx_cap * 2;
  if (want < RX_AHEAD) want = RX_AHEAD;
  if (want < need) want = need;
  if (want > c->rx_total) want = c->rx_total;
  if (want == 0) want = 1;
  if (want > SIZE_MAX - HUGE_PAGE - 4096) return -1;
  size_t cap = ((size_t)want + 4095) & ~(size_t)4095;
  size_t old = c->rx_buf ? c->rx_cap : 0;
  char *p = rx_map(c->rx_buf, old, cap);
  if (p == MAP_FAILED) return -1;
  if (!c->rx_buf) c->rx_ready = 0;
  c->rx_buf = p;
  c->rx_cap = cap;
  rx_populate(c, (size_t)need);
  return 0;
}

/* A buffer that cannot grow: the rest of the message is read and dropped, so the stream
 * stays framed, and the receive reports T_NOMEM at the end. */
static void rx_give_up(conn *c) {
  rx_release(c, 0);
  c->rx_discard = T_NOMEM;
}

static void rx_reset(conn *c) {
  rx_release(c, 1);
  luamp_fdlist_close(&c->rx_fds);
  c->rx_active = c->rx_discard = 0;
  c->rx_total = c->rx_got = 0;
}

static int ensure_scratch(conn *c) {
  if (!c->scratch) c->scratch = malloc(CHUNK);
  return c->scratch ? 0 : -1;
}

/* Whether a Ctrl-C is pending, without consuming it. */
static int interrupt_pending(void) {
  if (!luamp_take_interrupt()) return 0;
  luamp_request_interrupt();
  return 1;
}

/* Waits until fd has one of `events`; returns T_OK with *revents, or T_TIMEOUT/T_INTR/T_SYS. */
static int wait_fd(int fd, short events, double deadline, short *revents) {
  struct pollfd p = {.fd = fd, .events = events};
  int n = luamp_wait_fds(&p, 1, deadline);
  if (n == -2) return T_INTR;
  if (n < 0) return T_SYS;
  if (n == 0) return T_TIMEOUT;
  if (revents) *revents = p.revents;
  return T_OK;
}

/* ---- spinning (see the header) ---------------------------------------------------------- */

/* The sender's side, around a message's first record: the stamp before it goes (so a
 * receiver that the send wakes finds it fresh), the count once it went. */
static void hint_stamp(conn *c) {
  if (c->hints)
    atomic_store_explicit(&c->hints->d[c->dir].rang_at, (uint64_t)luamp_mono_ns(),
                          memory_order_relaxed);
}

static void hint_sent(conn *c) {
  if (c->hints) atomic_fetch_add_explicit(&c->hints->d[c->dir].sent, 1, memory_order_seq_cst);
}

static int hint_pending(hint_dir *h) {
  uint64_t sent = atomic_load_explicit(&h->sent, memory_order_acquire);
  uint64_t taken = atomic_load_explicit(&h->taken, memory_order_relaxed);
  return (int64_t)(sent - taken) > 0;
}

/* A receive began (from the socket or from rbuf): counts it, and judges the last spin
 * if it was in vain. The delay counted runs from the spin's start to the sender's stamp
 * when that falls between the spin's start and now, else to now. Receives that run ahead
 * of the count by more than a few messages (a sender that bumps nothing: it came as a
 * handle, without the page) end this end's spinning: it would only spin in vain. */
static void hint_taken(conn *c) {
  if (!c->hints) return;
  hint_dir *h = &c->hints->d[!c->dir];
  uint64_t taken = atomic_fetch_add_explicit(&h->taken, 1, memory_order_relaxed) + 1;
  uint64_t sent = atomic_load_explicit(&h->sent, memory_order_relaxed);
  if ((int64_t)(taken - sent) > UNANNOUNCED_MAX) c->hints_broken = 1;
  if (c->spin.gave_up > 0)
    luamp_spin_late(&c->spin, (double)atomic_load_explicit(&h->rang_at, memory_order_relaxed));
}

/* Before a receive that would block: spins until the page announces a message, for at
 * most the budget (and the deadline). Returns nothing: the receive that follows looks
 * at the socket either way. */
static void spin_for_message(conn *c, double deadline) {
  if (!c->hints || c->hints_broken || !luamp_wait_is_plain()) return;
  hint_dir *h = &c->hints->d[!c->dir];
  if (hint_pending(h)) return;
  double budget = luamp_spin_budget(&c->spin);
  if (deadline >= 0) {
    double left = (deadline - luamp_now()) * 1e9;
    if (left < budget) budget = left;
  }
  if (budget < LUAMP_SPIN_MIN_NS / 2 || luamp_interrupt_pending()) return;
  double t0 = luamp_mono_ns(), t = t0;
  unsigned rounds = 0;
  while (t - t0 < budget) {
    if (hint_pending(h)) {
      luamp_spin_caught(&c->spin, t - t0, budget);
      return;
    }
    for (int k = 0; k < 8; k++) luamp_cpu_relax();
    if ((++rounds & 7) == 0) {
      if (luamp_interrupt_pending()) return;
      t = luamp_mono_ns();
    }
  }
  if (hint_pending(h)) return;          /* (it came while this side was off its CPU) */
  luamp_spin_in_vain(&c->spin, t0, budget);
}

/* Maps the hint page of a new Pipe: one shared page, mapped a second time for the other
 * end (mremap of a shared mapping with old size 0), so each end owns its own mapping.
 * Without it (mapping refused) the Pipe simply never spins. */
static void hints_map(conn *a, conn *b) {
  void *p = mmap(NULL, HINT_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return;
  void *q = mremap(p, 0, HINT_PAGE, MREMAP_MAYMOVE);
  if (q == MAP_FAILED) {
    munmap(p, HINT_PAGE);
    return;
  }
  a->hints = p;
  b->hints = q;
  a->dir = 0;
  b->dir = 1;
  luamp_spin_init(&a->spin);
  luamp_spin_init(&b->spin);
}

/* ---- sending --------------------------------------------------------------------------- */

/* Errors after which a receive is simply tried again. ECONNRESET: when a peer exits with
 * messages of ours unread, the kernel reports the reset once, and only the next receive
 * yields the messages the peer sent before it died (then end of file). */
static int recv_retry(int err) { return err == EINTR || err == ECONNRESET; }

/* Moves every record waiting in the socket into rbuf (while our own send is stuck, so
 * that a peer blocked sending to us can finish and start reading). */
static int drain_incoming(conn *c) {
  for (;;) {
    if (c->rbuf_cap - c->rbuf_len < CHUNK && c->rbuf_pos > 0) {
      memmove(c->rbuf, c->rbuf + c->rbuf_pos, rbuf_avail(c));
      c->rbuf_len -= c->rbuf_pos;
      c->rbuf_pos = 0;
    }
    if (c->rbuf_cap - c->rbuf_len < CHUNK) {
      size_t cap = c->rbuf_cap ? c->rbuf_cap * 2 : 4 * CHUNK;
      while (cap - c->rbuf_len < CHUNK) cap *= 2;
      char *p = realloc(c->rbuf, cap);
      if (!p) return T_NOMEM;
      c->rbuf = p;
      c->rbuf_cap = cap;
    }
    ssize_t n;
    union { char buf[CMSG_ROOM]; struct cmsghdr align; } ctl;
    struct iovec iov = {c->rbuf + c->rbuf_len, CHUNK};
    struct msghdr msg;
    do {
      msg = (struct msghdr){.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                            .msg_controllen = sizeof ctl.buf};
      n = recvmsg(c->fd, &msg, MSG_DONTWAIT | MSG_TRUNC | MSG_CMSG_CLOEXEC);
    } while (n < 0 && recv_retry(errno));
    if (n > 0) take_cmsg_fds(c, &msg, NULL);
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? T_OK : T_SYS;
    if (n == 0) return T_OK;               /* peer gone: our send will report it */
    if (n > CHUNK) { c->rx_broken = 1; return T_OK; }
    c->rbuf_len += (size_t)n;
  }
}

/* Sends one record (with fds as SCM_RIGHTS when given), waiting while the socket is full. */
static int send_record(conn *c, struct iovec *iov, int iovcnt, const luamp_fdlist *fds) {
  struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)iovcnt};
  union { char buf[CMSG_ROOM]; struct cmsghdr align; } ctl;
  if (fds && fds->n > 0) {
    memset(ctl.buf, 0, sizeof ctl.buf);
    msg.msg_control = ctl.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)fds->n);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)fds->n);
    memcpy(CMSG_DATA(cm), fds->fd, sizeof(int) * (size_t)fds->n);
  }
  for (;;) {
    ssize_t n = sendmsg(c->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n >= 0) return T_OK;
    int err = errno;
    if (err == EINTR) continue;
    if (err == EPIPE || err == ECONNRESET || err == ENOTCONN) return T_PIPE;
    if (err != EAGAIN && err != EWOULDBLOCK) { errno = err; return T_SYS; }
    short rev = 0;
    int rc = wait_fd(c->fd, (short)(POLLOUT | (c->readable ? POLLIN : 0)), -1, &rev);
    if (rc != T_OK) return rc;
    if ((rev & POLLIN) && !(rev & POLLOUT)) {
      rc = drain_incoming(c);
      if (rc != T_OK) return rc;
    }
  }
}

static int send_frame(conn *c, const char *data, size_t len, const luamp_fdlist *fds) {
  unsigned char hdr[HDR];
  uint64_t nfds = fds ? (uint64_t)fds->n : 0;
  put_le64(hdr, len | nfds << FDS_SHIFT);
  size_t first = len < CHUNK - HDR ? len : CHUNK - HDR;
  struct iovec iov[2] = {{hdr, HDR}, {(void *)data, first}};
  hint_stamp(c);
  int rc = send_record(c, iov, 2, fds);
  if (rc != T_OK) return rc;
  hint_sent(c);
  for (size_t off = first; off < len;) {
    size_t k = len - off < CHUNK ? len - off : CHUNK;
    struct iovec one = {(void *)(data + off), k};
    rc = send_record(c, &one, 1, NULL);
    if (rc != T_OK) {
      /* The peer holds part of a frame; it must see EOF rather than wait forever. */
      c->tx_broken = 1;
      shutdown(c->fd, SHUT_WR);
      return rc;
    }
    off += k;
  }
  return T_OK;
}

/* ---- receiving ------------------------------------------------------------------------- */

/* A receive outside any task, with no pump to serve and no deadline, blocks in recvmsg
 * itself: one system call per message, as a plain blocking read, where a poll first
 * would make two. It keeps the guarantees of luamp_wait_fds: the socket's SO_RCVTIMEO is
 * LUAMP_WAIT_SLICE, so the kernel neither sleeps longer than a slice (a Ctrl-C whose
 * handler ran just before the call is seen a slice later at most) nor restarts the call
 * after a signal handler, even one installed with SA_RESTART (signal(7)): the EINTR
 * looks at the interrupt mark. The timeout is the socket's, shared by every descriptor
 * of it; luamp's other receives never block in the kernel, so it changes nothing else. */
static int direct_receive_ok(conn *c) {
  if (!luamp_wait_is_plain()) return 0;
  if (c->sliced == 0) {
    struct timeval tv = {.tv_sec = 0, .tv_usec = (suseconds_t)(LUAMP_WAIT_SLICE * 1e6)};
    c->sliced = setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0 ? 1 : -1;
  }
  return c->sliced == 1;
}

/* Starts the next message: reads its length (and, from the socket, its first record).
 * On T_OK either the whole message is in scratch (*small set to its length) or
 * rx_active is set with rx_got bytes of it in place. With nowait, an empty socket
 * returns T_TIMEOUT at once instead of waiting: a reader acting on a readiness hint
 * (which code that ran since the poll may have made stale) goes back to its own wait. */
static int rx_start(conn *c, double deadline, int nowait, uint64_t maxlen, size_t *small,
                    int *have_small) {
  unsigned char hdr[HDR];
  size_t first = 0;
  *have_small = 0;
  if (ensure_scratch(c) < 0) return T_NOMEM;
  int from_rbuf = rbuf_avail(c) > 0;
  luamp_fdlist_close(&c->rx_fds);
  if (from_rbuf) {
    if (rbuf_avail(c) < HDR) { c->rx_broken = 1; return T_CORRUPT; }
    rbuf_take(c, hdr, HDR);
  } else {
    /* Request and answer (a ping-pong): when the last receive found the socket empty,
     * this one waits before its first recv instead of after a recv that fails with
     * EAGAIN, one system call fewer per message. Every 16th receive tries the recv
     * first again, which ends the mode once messages arrive ahead of their reader; so
     * does a pending Ctrl-C, which must not win over a message already there. */
    if (!nowait) spin_for_message(c, deadline);
    int direct = !nowait && deadline < 0 && !luamp_interrupt_pending() && direct_receive_ok(c);
    int wait_first = !direct && !nowait && c->waited && (c->waited++ & 15) != 0 && !interrupt_pending();
    if (wait_first) {
      int rc = wait_fd(c->fd, POLLIN, deadline, NULL);
      if (rc != T_OK) return rc;
    }
    for (int empty = 0;; empty = 1) {
      struct iovec iov[2] = {{hdr, HDR}, {c->scratch, CHUNK - HDR}};
      union { char buf[CMSG_ROOM]; struct cmsghdr align; } ctl;
      struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2, .msg_control = ctl.buf,
                           .msg_controllen = sizeof ctl.buf};
      ssize_t n = recvmsg(c->fd, &msg, (direct ? 0 : MSG_DONTWAIT) | MSG_CMSG_CLOEXEC);
      if (n > 0) take_cmsg_fds(c, &msg, &c->rx_fds);
      if (n > 0) {
        if (n < HDR || (msg.msg_flags & MSG_TRUNC)) { c->rx_broken = 1; return T_CORRUPT; }
        first = (size_t)n - HDR;
        if (!wait_first && !empty) c->waited = 0;
        else if (!c->waited) c->waited = 1;
        break;
      }
      if (n == 0) return T_EOF;
      if (direct && errno == EINTR && luamp_interrupt_pending()) return T_INTR;
      if (recv_retry(errno)) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) return T_SYS;
      if (nowait) return T_TIMEOUT;
      /* A slice passed in a direct receive (or its socket is non-blocking): from here on
       * luamp_wait_fds waits, with its own slices and its own look at the mark. */
      direct = 0;
      /* Another reader may take the record between poll and recv: then wait again. */
      int rc = wait_fd(c->fd, POLLIN, deadline, NULL);
      if (rc != T_OK) return rc;
    }
  }
  hint_taken(c);
  uint64_t total = get_le64(hdr);
  unsigned nfds = (unsigned)(total >> FDS_SHIFT);
  total &= LEN_MASK;
  if (from_rbuf) unstash(c, nfds);
  if (total > MAX_MESSAGE || first > total) { c->rx_broken = 1; return T_CORRUPT; }
  if (first == total && total <= maxlen) {
    *small = first;
    *have_small = 1;
    return T_OK;
  }
  c->rx_active = 1;
  c->rx_total = total;
  c->rx_got = first;
  if (total > maxlen) c->rx_discard = T_TOOLONG;
  else if (rx_reserve(c, first) < 0) rx_give_up(c);
  else memcpy(c->rx_buf, c->scratch, first);
  return T_OK;
}

/* Receives the rest of the active message. */
static int rx_continue(conn *c, double deadline) {
  while (c->rx_got < c->rx_total) {
    uint64_t want = c->rx_total - c->rx_got;
    if (want > CHUNK) want = CHUNK;
    if (!c->rx_discard && rx_reserve(c, c->rx_got + want) < 0) rx_give_up(c);
    char *dst = c->rx_discard ? c->scratch : c->rx_buf + c->rx_got;
    size_t avail = rbuf_avail(c);
    if (avail > 0) {
      size_t k = avail < want ? avail : (size_t)want;
      rbuf_take(c, dst, k);
      c->rx_got += k;
      continue;
    }
    ssize_t n = recv(c->fd, dst, (size_t)want, MSG_DONTWAIT | MSG_TRUNC);
    if (n > 0) {
      if ((uint64_t)n > want) { rx_reset(c); c->rx_broken = 1; return T_CORRUPT; }
      c->rx_got += (uint64_t)n;
      continue;
    }
    if (n == 0) {
      c->cut_got = c->rx_got;
      c->cut_total = c->rx_total;
      rx_reset(c);
      return T_CUT;
    }
    if (recv_retry(errno)) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return T_SYS;
    int rc = wait_fd(c->fd, POLLIN, deadline, NULL);
    if (rc != T_OK) return rc;
  }
  return T_OK;
}

/* Keeps the whole message data[0..len) (in scratch, or the active one in rx_buf) as the
 * active message, for the next receive to deliver; 0 when there is no memory for it. */
static int keep_message(conn *c, const char *data, size_t len) {
  if (c->rx_active && data == c->rx_buf) return 1;
  c->rx_total = len;     /* (rx_reserve sizes the buffer by it) */
  if (rx_reserve(c, len) < 0) {
    c->rx_total = 0;
    return 0;
  }
  memmove(c->rx_buf, data, len);
  c->rx_active = 1;
  c->rx_got = len;
  return 1;
}

/* Receives one message. On T_OK, *data and *len give it: inside scratch, or in rx_buf
 * (which the caller frees with rx_finish after pushing the value). nowait: see rx_start;
 * once a message has begun to arrive, its rest is waited for (the sender is in the middle
 * of it, or gone, which ends the wait with EOF).
 * A Ctrl-C that comes during a receive is raised, by the host's hook, when the receive
 * returns: a message received by then would be lost. So a receive that has a whole
 * message and finds a Ctrl-C pending returns T_INTR with the message kept, as the active
 * one, for the next receive to deliver. (Until then it reads what is there, as it did:
 * the part of a message read so far is kept anyway.) */
static int rx_message(conn *c, double deadline, int nowait, uint64_t maxlen, const char **data,
                      size_t *len) {
  if (c->rx_broken) return T_CORRUPT;
  if (!c->rx_active) {
    size_t small;
    int have_small;
    int rc = rx_start(c, deadline, nowait, maxlen, &small, &have_small);
    if (rc != T_OK) return rc;
    if (have_small) {
      /* (no memory to keep it in: delivered now after all) */
      if (luamp_interrupt_pending() && keep_message(c, c->scratch, small)) return T_INTR;
      *data = c->scratch;
      *len = small;
      return T_OK;
    }
  }
  int rc = rx_continue(c, deadline);
  if (rc == T_OK && luamp_interrupt_pending()) rc = T_INTR;
  if (rc != T_OK) return rc;
  /* (rx_total > maxlen: a receive resumed under a smaller maxlength) */
  if (c->rx_discard || c->rx_total > maxlen) {
    rc = c->rx_discard ? c->rx_discard : T_TOOLONG;
    c->dropped = c->rx_total;
    rx_reset(c);
    return rc;
  }
  *data = c->rx_buf;
  *len = (size_t)c->rx_total;
  return T_OK;
}

static void rx_finish(conn *c) {
  luamp_fdlist_close(&c->rx_fds);
  c->rx_active = 0;
  c->rx_total = c->rx_got = 0;
  rx_release(c, 1);
}

/* ---- Lua binding ----------------------------------------------------------------------- */

/* The functions of the Connection metatable and of its method table hold that
 * metatable as their first upvalue: comparing with it is luaL_checkudata's check
 * without looking the name up in the registry on every send and receive. */
static conn *to_conn(lua_State *L, int idx) {
  conn *c = lua_touserdata(L, idx);
  int ok = c != NULL && lua_getmetatable(L, idx);
  if (ok) {
    ok = lua_rawequal(L, -1, lua_upvalueindex(1));
    lua_pop(L, 1);
  }
  if (!ok) luaL_typeerror(L, idx, CONN_MT);
  return c;
}

static conn *check_conn(lua_State *L, int idx) {
  conn *c = to_conn(L, idx);
  if (c->fd < 0) luamp_raise(L, "Closed", "connection is closed");
  return c;
}

/* err: the errno saved right after the failing helper returned (for T_SYS). */
static void raise_transfer(lua_State *L, const conn *c, int rc, int err, const char *what,
                           uint64_t len, uint64_t maxlen) {
  switch (rc) {
    case T_TIMEOUT: luamp_raise(L, "Timeout", "%s timed out", what);
    case T_INTR: luamp_take_interrupt(); luamp_raise(L, "Interrupted", "%s interrupted", what);
    case T_EOF: luamp_raise(L, "EOF", "%s: the other end of the connection is closed", what);
    case T_CUT:
      luamp_raise(L, "EOF", "%s: the other end of the connection closed in the middle of a "
                  "message (%llu of the %llu bytes it announced arrived)", what,
                  (unsigned long long)c->cut_got, (unsigned long long)c->cut_total);
    case T_PIPE: luamp_raise(L, "BrokenPipe", "%s: the other end of the connection is closed", what);
    case T_CORRUPT: luamp_raise(L, "Value", "%s: the peer sent malformed data", what);
    case T_TOOLONG:
      luamp_raise(L, "Value", "%s: message of %llu bytes is longer than maxlength %llu (discarded)",
                  what, (unsigned long long)len, (unsigned long long)maxlen);
    case T_NOMEM: luamp_raise(L, "Value", "%s: out of memory", what);
    default: luamp_raise_errno(L, "Value", what, err);
  }
}

static void conn_release(conn *c) {
  if (c->fd >= 0) luamp_close_fd(c->fd);
  c->fd = -1;
  free(c->scratch);
  c->scratch = NULL;
  free(c->rbuf);
  c->rbuf = NULL;
  c->rbuf_pos = c->rbuf_len = c->rbuf_cap = 0;
  rx_reset(c);
  rx_release(c, 0);
  luamp_buf_free(&c->tx);
  stash_close(c);
  if (c->hints) munmap(c->hints, HINT_PAGE);
  c->hints = NULL;
}

static conn *new_conn_ud(lua_State *L) {
  conn *c = lua_newuserdatauv(L, sizeof *c, 0);
  memset(c, 0, sizeof *c);
  c->fd = -1;
  c->rx_fds.n = 0;
  luamp_buf_init(&c->tx);
  luaL_setmetatable(L, CONN_MT);
  return c;
}

/* A sender polling for room is woken only once less than a quarter of its socket buffer
 * is in flight; with the default buffer that is less than one record, so the two sides
 * would take turns instead of overlapping. A larger buffer (best effort: the system caps
 * it at net.core.wmem_max) keeps several records in flight. */
static void widen_buffer(int fd) {
  int size = SOCKET_BUFFER;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
}

/* _core.pipe(duplex) -> conn1, conn2 (for duplex=false: reader, writer) */
static int l_pipe(lua_State *L) {
  int duplex = lua_isnoneornil(L, 1) ? 1 : lua_toboolean(L, 1);
  conn *a = new_conn_ud(L);
  conn *b = new_conn_ud(L);
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
    luamp_raise_errno(L, "Value", "Pipe: socketpair", errno);
  a->fd = sv[0];
  b->fd = sv[1];
  hints_map(a, b);
  widen_buffer(sv[0]);
  widen_buffer(sv[1]);
  a->readable = 1;
  a->writable = duplex;
  b->readable = duplex;
  b->writable = 1;
  if (!duplex) {
    shutdown(sv[0], SHUT_WR);
    shutdown(sv[1], SHUT_RD);
  }
  return 2;
}

static void check_writable(lua_State *L, conn *c) {
  if (!c->writable) luamp_raise(L, "Value", "connection is read-only");
  if (c->tx_broken) luamp_raise(L, "BrokenPipe", "an earlier send on this connection was interrupted mid-message");
}

static void check_readable(lua_State *L, conn *c) {
  if (!c->readable) luamp_raise(L, "Value", "connection is write-only");
}

static int finish_send(lua_State *L, conn *c, int rc, const char *what) {
  int err = errno;
  if (c->tx.cap > KEEP_BUFFER) luamp_buf_free(&c->tx);
  if (rc != T_OK) raise_transfer(L, c, rc, err, what, 0, 0);
  return 0;
}

/* :send_bytes(s) */
static int l_send_bytes(lua_State *L) {
  conn *c = check_conn(L, 1);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  check_writable(L, c);
  return finish_send(L, c, send_frame(c, s, len, NULL), "send_bytes");
}

/* :_send(s, [fds]): bytes (from _core.dumpx) with the descriptors of a bundle, which
 * stays the caller's (the Pool may send the same chunk again to another worker). */
static int l_send_fds(lua_State *L) {
  conn *c = check_conn(L, 1);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  luamp_fdlist *fds = luamp_fds_check_bundle(L, 3);
  check_writable(L, c);
  return finish_send(L, c, send_frame(c, s, len, fds), "send");
}

/* :send(v): v through the codec */
static int l_send(lua_State *L) {
  conn *c = check_conn(L, 1);
  luaL_checkany(L, 2);
  check_writable(L, c);
  c->tx.len = 0;
  luamp_fdlist fds;
  if (luamp_encode_fds(L, 2, &c->tx, "message", &fds) < 0) return lua_error(L);
  /* the descriptors are borrowed from objects that v (still on the stack) keeps open */
  return finish_send(L, c, send_frame(c, c->tx.data, c->tx.len, &fds), "send");
}

static uint64_t maxlength_arg(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return UINT64_MAX;
  lua_Integer m = luaL_checkinteger(L, idx);
  if (m < 0) luamp_raise(L, "Value", "recv_bytes: negative maxlength");
  return (uint64_t)m;
}

/* Pushes the received message (as a string, or decoded) and releases the buffer and the
 * descriptors decoding did not take. With decode 2 (_recv), the string and, when the
 * message brought descriptors, a bundle holding them.
 * A Ctrl-C that comes while a large message is decoded (or copied) is raised by the
 * host's hook when the receive returns: then, or when the decoding itself raised it,
 * the message is kept for the next receive as rx_message keeps it. (Not one with
 * descriptors: decoding has handed them out.) */
static int deliver(lua_State *L, conn *c, const char *data, size_t len, int decode,
                   const char *what) {
  int keepable = c->rx_fds.n == 0;
  if (decode == 1) {
    if (luamp_decode_fds(L, data, len, 0, &c->rx_fds) < 0) {
      if (!(keepable && luamp_is_interrupted(L, -1) && keep_message(c, data, len))) rx_finish(c);
      return lua_error(L);
    }
  } else {
    lua_pushlstring(L, data, len);
  }
  if (keepable && luamp_interrupt_pending() && keep_message(c, data, len)) {
    lua_pop(L, 1);
    luamp_take_interrupt();
    luamp_raise(L, "Interrupted", "%s interrupted", what);
  }
  if (decode == 2 && c->rx_fds.n > 0) {
    luamp_fdlist *b = luamp_fds_push_bundle(L);
    *b = c->rx_fds;
    c->rx_fds.n = 0;
    rx_finish(c);
    return 2;
  }
  rx_finish(c);
  return 1;
}

static int do_recv(lua_State *L, conn *c, int decode, int nowait, uint64_t maxlen, const char *what) {
  const char *data;
  size_t len;
  int rc = rx_message(c, -1, nowait, maxlen, &data, &len);
  if (rc == T_TIMEOUT && nowait) return 0;
  if (rc != T_OK) raise_transfer(L, c, rc, errno, what, c->dropped, maxlen);
  return deliver(L, c, data, len, decode, what);
}

/* :recv_bytes([maxlength]) -> string */
static int l_recv_bytes(lua_State *L) {
  conn *c = check_conn(L, 1);
  check_readable(L, c);
  return do_recv(L, c, 0, 0, maxlength_arg(L, 2), "recv_bytes");
}

/* :_recv_bytes_nowait() -> string, [fds], or nothing when no message has begun to
 * arrive: the receive for a reader that only has a readiness hint (luamp's Pool); fds as
 * for _recv */
static int l_recv_bytes_nowait(lua_State *L) {
  conn *c = check_conn(L, 1);
  check_readable(L, c);
  return do_recv(L, c, 2, 1, UINT64_MAX, "recv_bytes");
}

/* :_recv() -> string, [fds]: the raw message and the descriptors that came with it */
static int l_recv_fds(lua_State *L) {
  conn *c = check_conn(L, 1);
  check_readable(L, c);
  return do_recv(L, c, 2, 0, UINT64_MAX, "recv");
}

/* :recv() -> value */
static int l_recv(lua_State *L) {
  conn *c = check_conn(L, 1);
  check_readable(L, c);
  return do_recv(L, c, 1, 0, UINT64_MAX, "recv");
}

/* (a whole message held by a receive that a Ctrl-C ended, see rx_message, counts) */
static int buffered(const conn *c) {
  return rbuf_avail(c) > 0 || (c->rx_active && c->rx_got == c->rx_total);
}

/* :poll([timeout]) -> true when a receive would not block (data, or the peer closed) */
static int l_poll(lua_State *L) {
  conn *c = check_conn(L, 1);
  check_readable(L, c);
  /* no timeout: look without waiting; math.huge: wait forever */
  double deadline = lua_isnoneornil(L, 2) ? luamp_now() : luamp_deadline_arg(L, 2);
  if (buffered(c) || c->rx_broken) {
    lua_pushboolean(L, 1);
    return 1;
  }
  short rev = 0;
  int rc = wait_fd(c->fd, POLLIN, deadline, &rev);
  if (rc == T_TIMEOUT) rc = T_OK, rev = 0;
  if (rc != T_OK) raise_transfer(L, c, rc, errno, "poll", 0, 0);
  lua_pushboolean(L, rev != 0);
  return 1;
}

/* :fileno() -> fd */
static int l_fileno(lua_State *L) {
  lua_pushinteger(L, check_conn(L, 1)->fd);
  return 1;
}

/* :_ready_now() -> true when buffered data makes the connection ready without polling */
static int l_ready_now(lua_State *L) {
  conn *c = check_conn(L, 1);
  lua_pushboolean(L, buffered(c) || c->rx_broken);
  return 1;
}

/* :_spin_budget() -> the spin (seconds) this end's next receive may afford, or nil when
 * it never spins (no hint page, or a message came unannounced); for the specs */
static int l_spin_budget(lua_State *L) {
  conn *c = check_conn(L, 1);
  if (!c->hints || c->hints_broken) return 0;
  lua_pushnumber(L, luamp_spin_budget(&c->spin) / 1e9);
  return 1;
}

/* :_spin() -> whether a message is announced after one spin (as a receive would spin
 * before it blocks; it takes nothing); for the specs */
static int l_spin(lua_State *L) {
  conn *c = check_conn(L, 1);
  spin_for_message(c, -1);
  lua_pushboolean(L, c->hints && hint_pending(&c->hints->d[!c->dir]));
  return 1;
}

static int l_close(lua_State *L) {
  conn_release(to_conn(L, 1));
  return 0;
}

static int l_tostring(lua_State *L) {
  conn *c = to_conn(L, 1);
  if (c->fd < 0) {
    lua_pushliteral(L, "<Connection closed>");
  } else {
    lua_pushfstring(L, "<Connection fd=%d%s%s>", c->fd, c->readable ? " readable" : "",
                    c->writable ? " writable" : "");
  }
  return 1;
}

/* __index: methods first, then the fields closed, readable, writable. A method is found
 * without looking at the object: the method checks it. */
static int l_index(lua_State *L) {
  lua_pushvalue(L, 2);
  if (lua_rawget(L, lua_upvalueindex(2)) != LUA_TNIL) return 1;
  conn *c = to_conn(L, 1);
  const char *k = lua_tostring(L, 2);
  if (!k) return 1;
  if (strcmp(k, "closed") == 0) lua_pushboolean(L, c->fd < 0);
  else if (strcmp(k, "readable") == 0) lua_pushboolean(L, c->fd >= 0 && c->readable);
  else if (strcmp(k, "writable") == 0) lua_pushboolean(L, c->fd >= 0 && c->writable);
  else lua_pushnil(L);
  return 1;
}

static void push_identity_key(lua_State *L, const struct stat *st) {
  lua_pushfstring(L, "Connection %I:%I", (lua_Integer)st->st_dev, (lua_Integer)st->st_ino);
}

/* __luamp_handle: a Connection crosses with its socket (carried = true, fdi = the socket's
 * index among the message's descriptors), or, for luamp.dumps, as its fd number plus the
 * socket's identity, so a receiver can check that it inherited that very socket. */
static int l_handle(lua_State *L) {
  conn *c = check_conn(L, 1);
  struct stat st;
  if (fstat(c->fd, &st) < 0) luamp_raise_errno(L, "Serialize", "Connection", errno);
  push_identity_key(L, &st);
  luamp_handle_remember(L, 1, lua_tostring(L, -1));
  lua_pop(L, 1);
  int fdi = luamp_handle_send_fd(L, c->fd);
  lua_pushliteral(L, "luamp.Connection");
  lua_createtable(L, 0, 6);
  if (fdi >= 0) {
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "carried");
    lua_pushinteger(L, fdi);
    lua_setfield(L, -2, "fdi");
  } else {
    lua_pushinteger(L, c->fd);
    lua_setfield(L, -2, "fd");
    lua_pushinteger(L, (lua_Integer)st.st_ino);
    lua_setfield(L, -2, "ino");
    lua_pushinteger(L, (lua_Integer)st.st_dev);
    lua_setfield(L, -2, "dev");
    lua_pushinteger(L, getpid());
    lua_setfield(L, -2, "pid");
  }
  lua_pushboolean(L, c->readable);
  lua_setfield(L, -2, "readable");
  lua_pushboolean(L, c->writable);
  lua_setfield(L, -2, "writable");
  return 2;
}

/* Rebuilds a Connection from its handle payload: on the socket that came with the
 * message, or on a dup of the same socket if this process inherited it; the Connection
 * this process already has on that socket if there is one. */
static int l_from_handle(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "readable");
  int readable = lua_toboolean(L, -1);
  lua_getfield(L, 1, "writable");
  int writable = lua_toboolean(L, -1);
  lua_pop(L, 2);
  conn *c = new_conn_ud(L);              /* owns the descriptor from here on */
  struct stat st;
  if (luamp_handle_is_carried(L, 1)) {
    c->fd = luamp_handle_recv_fd(L, 1, "fdi", "Connection");
    if (fstat(c->fd, &st) < 0 || !S_ISSOCK(st.st_mode))
      luamp_raise(L, "Value", "cannot receive a Connection: the descriptor that came with it is "
                  "not a socket");
  } else {
    lua_Integer fd = luamp_handle_field(L, 1, "Connection handle", "fd");
    lua_Integer ino = luamp_handle_field(L, 1, "Connection handle", "ino");
    lua_Integer dev = luamp_handle_field(L, 1, "Connection handle", "dev");
    lua_Integer pid = luamp_handle_field(L, 1, "Connection handle", "pid");
    if (fd < 0 || fd > INT32_MAX || fstat((int)fd, &st) < 0 || !S_ISSOCK(st.st_mode) ||
        (lua_Integer)st.st_ino != ino || (lua_Integer)st.st_dev != dev)
      luamp_raise(L, "Value",
                  "cannot receive a Connection from process %lld: this process did not inherit "
                  "its socket (and it came without its descriptor)", (long long)pid);
    c->fd = fcntl((int)fd, F_DUPFD_CLOEXEC, 0);
    if (c->fd < 0) luamp_raise_errno(L, "Value", "Connection: dup", errno);
  }
  push_identity_key(L, &st);
  const char *key = lua_tostring(L, -1);
  if (luamp_handle_find(L, key)) {
    conn *old = luaL_testudata(L, -1, CONN_MT);
    if (old && old->fd >= 0) {
      conn_release(c);                   /* the same socket, already open here */
      return 1;
    }
    lua_pop(L, 1);
  }
  luamp_handle_remember(L, -2, key);
  lua_pop(L, 1);
  c->readable = readable;
  c->writable = writable;
  return 1;
}

static int l_is_connection(lua_State *L) {
  lua_pushboolean(L, luaL_testudata(L, 1, CONN_MT) != NULL);
  return 1;
}

static int l_gc(lua_State *L) {
  conn_release(to_conn(L, 1));
  return 0;
}

int luamp_open_connection(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"send", l_send},
    {"recv", l_recv},
    {"send_bytes", l_send_bytes},
    {"recv_bytes", l_recv_bytes},
    {"poll", l_poll},
    {"fileno", l_fileno},
    {"close", l_close},
    {"_ready_now", l_ready_now},
    {"_send", l_send_fds},
    {"_recv", l_recv_fds},
    {"_recv_bytes_nowait", l_recv_bytes_nowait},
    {"_spin_budget", l_spin_budget},
    {"_spin", l_spin},
    {NULL, NULL}
  };
  static const luaL_Reg meta[] = {
    {"__gc", l_gc},
    {"__close", l_gc},
    {"__tostring", l_tostring},
    {"__luamp_handle", l_handle},
    {NULL, NULL}
  };
  static const luaL_Reg fns[] = {
    {"pipe", l_pipe},
    {"is_connection", l_is_connection},
    {NULL, NULL}
  };
  if (luaL_newmetatable(L, CONN_MT)) {
    /* every function of the metatable and of the methods holds it (to_conn) */
    lua_pushvalue(L, -1);
    luaL_setfuncs(L, meta, 1);
    luaL_newlibtable(L, methods);
    lua_pushvalue(L, -2);
    luaL_setfuncs(L, methods, 1);
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_pushcclosure(L, l_index, 2);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUAMP_HANDLES_KEY);
  lua_pushcfunction(L, l_from_handle);
  lua_setfield(L, -2, "luamp.Connection");
  lua_pop(L, 1);
  luaL_setfuncs(L, fns, 0);
  return 0;
}
