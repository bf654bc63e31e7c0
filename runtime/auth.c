/*
 * auth.c — authenticated framed channels between a manager server and its clients.
 *
 * A channel is a stream socket (TCP or Unix) carrying frames: a 4-byte big-endian length,
 * then that many bytes. It owns its receive buffer, which grows only as bytes arrive (a
 * length prefix alone never allocates more than 64 KiB), and its send buffer, written
 * without blocking so one slow peer cannot hold up a server that serves many.
 *
 * The handshake is mutual and fresh each way, all with a key K = BLAKE2b(authkey):
 *   server -> client  "LUAMPM3\0" || Ns || O                  (Ns: 32 random bytes)
 *   client -> server  Nc || C || MAC_K("C" || T)              (Nc: 32 random bytes)
 *   server -> client  1 || MAC_K("S" || T)   or   0 (refused) and close
 * where T = Ns || Nc || O || C (MAC = keyed BLAKE2b, compared in constant time). O is the
 * set of session ciphers the server offers (LUAMP_SUITE_* bits), C the one the client
 * chose from it: AES-256-GCM when both sides' CPUs run it (AES-NI: about a third of
 * ChaCha20-Poly1305's instructions for a small frame), else ChaCha20-Poly1305. Both are
 * in T, so a man in the middle who edits the offer (a downgrade) breaks both proofs.
 * Each side proves it holds K over a nonce the other just chose, so a recorded handshake
 * replays to nobody, and the server shows its proof only to a client that proved first
 * (it is no oracle). Before this completes no frame over 64 KiB is read and nothing is
 * decoded at all: the handshake frames have fixed sizes and are checked byte for byte.
 *
 * Afterwards the session key S = MAC_K("luamp session" || T) gives one key per direction,
 * and every frame is sealed with the chosen AEAD (the header as associated data, the
 * frame's number in its direction as the nonce: never reused under one key). A forged,
 * replayed, reordered or dropped frame fails to open: the channel is broken and reports
 * Auth. Sealing also hides the traffic (proxies carry the authkey, as Python's do under
 * spawn). The AES keys are expanded once per session (crypto_aead_aes256gcm_beforenm).
 *
 * The Lua binding (_core.auth_*) gives the manager (lua/luamp/manager.lua) listeners,
 * channels with a non-blocking step for the server's loop and blocking calls for clients
 * (every wait through luamp_wait_fds, so Ctrl-C raises Interrupted), and a poll over many
 * channels. Payloads are codec values, decoded trusted: only authenticated peers get there.
 *
 * Plain calls. Most proxy calls carry only nils, booleans, numbers and strings (d[k] = v,
 * q:put(1)), and most replies too. Such a request or reply goes as a vector of plain
 * values (VEC_TAG, a count, then each value: a tag byte and its bytes) instead of a codec
 * table: no table on either side, no protected call, no memo; for a d[k] round trip that
 * was about a quarter of the instructions of both processes. The first byte tells the
 * two kinds apart (a codec value starts with its version, 1). A request vector holds the
 * id, the method and the arguments, which the server's receive hands over as values (no
 * table; step still rebuilds the request table {id, method, nargs, args...}); a reply
 * vector holds the results of a call that succeeded (reply seals them from values).
 * Anything else (a table argument, an error reply) goes through the codec as before, so
 * values shared between arguments keep their identity. Vectors are checked
 * like any other input: count, tags and lengths against the frame's end.
 */
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <sodium.h>

#include "auth.h"

#if defined(__SANITIZE_ADDRESS__)
#define AUTH_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define AUTH_ASAN 1
#endif
#endif
#ifdef AUTH_ASAN
#include <sanitizer/asan_interface.h>
#endif

#define CHAN_MT "luamp.AuthChannel"
#define LISTENER_MT "luamp.AuthListener"
/* The magic names the manager protocol as well as the handshake: M3 added sessions and
 * releases (manager.lua), which a client and a server must both speak (a server of M3
 * frees what an M2 client, pinning nothing, may have handed on), so the two refuse
 * each other at the hello. */
#define MAGIC "LUAMPM3"                      /* 8 bytes with its NUL */
#define HELLO_LEN (8 + LUAMP_AUTH_NONCE + 1)
#define PROOF_LEN (LUAMP_AUTH_NONCE + 1 + 32)
#define VERDICT_OK_LEN (1 + 32)
#define TAG crypto_aead_chacha20poly1305_ietf_ABYTES
#define NPUB crypto_aead_chacha20poly1305_ietf_NPUBBYTES
#define SUITES_KNOWN (LUAMP_SUITE_CHACHA | LUAMP_SUITE_AESGCM)
_Static_assert(crypto_aead_aes256gcm_ABYTES == TAG, "both suites have 16-byte tags");
_Static_assert(crypto_aead_aes256gcm_NPUBBYTES == NPUB, "both suites have 12-byte nonces");
#define IN_MIN 16384                         /* first receive buffer */
#define VEC_TAG 0xa5                         /* first byte of a payload of plain values */
#define VEC_MAX 250                          /* values in one vector */
enum { V_NIL = 'n', V_FALSE = 'f', V_TRUE = 't', V_INT = 'i', V_FLOAT = 'd', V_STR = 's' };

/* ---- the channel (no Lua) ---------------------------------------------------------- */

static void put_be32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* A message handed out by a step lives in the receive buffer, followed by its tag and
 * maybe more frames. Under ASan its tag and the buffer's unused room are poisoned until
 * the next step, so a reader of the payload that strays past its end is caught even
 * though the memory is there (fuzz/fuzz_plain.c relies on it). */
static void guard_message(luamp_chan *c, uint8_t *end) {
#ifdef AUTH_ASAN
  ASAN_POISON_MEMORY_REGION(end, TAG);
  ASAN_POISON_MEMORY_REGION(c->in + c->in_end, c->in_cap - c->in_end);
#else
  (void)c;
  (void)end;
#endif
}

static void unguard_message(luamp_chan *c) {
#ifdef AUTH_ASAN
  if (c->in) ASAN_UNPOISON_MEMORY_REGION(c->in, c->in_cap);
#else
  (void)c;
#endif
}

void luamp_chan_init(luamp_chan *c, int fd, int role) {
  memset(c, 0, sizeof *c);
  c->fd = fd;
  c->role = role;
  c->state = CH_FRESH;
  c->suites = LUAMP_SUITE_CHACHA | (crypto_aead_aes256gcm_is_available() ? LUAMP_SUITE_AESGCM : 0);
  luamp_buf_init(&c->out);
}

static void free_gcm(luamp_chan *c) {
  if (!c->gcm) return;
  sodium_memzero(c->gcm, 2 * sizeof(crypto_aead_aes256gcm_state));
  free(c->gcm);
  c->gcm = NULL;
}

void luamp_chan_free(luamp_chan *c) {
  if (c->fd >= 0) luamp_close_fd(c->fd);
  c->fd = -1;
  unguard_message(c);
  free(c->in);
  c->in = NULL;
  c->in_start = c->in_end = c->in_cap = c->consume = 0;
  luamp_buf_free(&c->out);
  c->out_off = 0;
  sodium_memzero(c->key, sizeof c->key);
  sodium_memzero(c->tx_key, sizeof c->tx_key);
  sodium_memzero(c->rx_key, sizeof c->rx_key);
  free_gcm(c);
  c->state = CH_BROKEN;
}

/* MAC_K(label || Ns || Nc || O || C) */
static void handshake_mac(const luamp_chan *c, const char *label, uint8_t out[32]) {
  crypto_generichash_state st;
  crypto_generichash_init(&st, c->key, sizeof c->key, 32);
  crypto_generichash_update(&st, (const unsigned char *)label, strlen(label));
  crypto_generichash_update(&st, c->nonce_s, sizeof c->nonce_s);
  crypto_generichash_update(&st, c->nonce_c, sizeof c->nonce_c);
  crypto_generichash_update(&st, &c->offer, 1);
  crypto_generichash_update(&st, &c->suite, 1);
  crypto_generichash_final(&st, out, 32);
}

static crypto_aead_aes256gcm_state *gcm_tx(const luamp_chan *c) {
  return (crypto_aead_aes256gcm_state *)c->gcm;
}

static crypto_aead_aes256gcm_state *gcm_rx(const luamp_chan *c) {
  return (crypto_aead_aes256gcm_state *)c->gcm + 1;
}

/* 0, or -1 out of memory (the AES suite's expanded keys) */
static int derive_session(luamp_chan *c) {
  uint8_t s[32], c2s[32], s2c[32];
  handshake_mac(c, "luamp session", s);
  crypto_generichash(c2s, 32, (const unsigned char *)"client to server", 16, s, 32);
  crypto_generichash(s2c, 32, (const unsigned char *)"server to client", 16, s, 32);
  memcpy(c->tx_key, c->role == CH_CLIENT ? c2s : s2c, 32);
  memcpy(c->rx_key, c->role == CH_CLIENT ? s2c : c2s, 32);
  c->tx_ctr = c->rx_ctr = 0;
  sodium_memzero(s, sizeof s);
  sodium_memzero(c2s, sizeof c2s);
  sodium_memzero(s2c, sizeof s2c);
  if (c->suite == LUAMP_SUITE_AESGCM) {
    free_gcm(c);
    c->gcm = aligned_alloc(16, 2 * sizeof(crypto_aead_aes256gcm_state));
    if (!c->gcm) return -1;
    crypto_aead_aes256gcm_beforenm(gcm_tx(c), c->tx_key);
    crypto_aead_aes256gcm_beforenm(gcm_rx(c), c->rx_key);
  }
  c->state = CH_AUTHED;
  return 0;
}

/* The 12-byte nonce of frame number ctr (in its direction). */
static void frame_nonce(uint8_t npub[NPUB], uint64_t ctr) {
  memset(npub, 0, NPUB);
  for (int i = 0; i < 8; i++) npub[4 + i] = (uint8_t)(ctr >> (8 * i));
}

/* Queues an unsealed (handshake) frame. */
static int queue_plain(luamp_chan *c, const void *data, size_t len) {
  if (luamp_buf_reserve(&c->out, 4 + len) != 0) return -1;
  put_be32((uint8_t *)c->out.data + c->out.len, (uint32_t)len);
  memcpy(c->out.data + c->out.len + 4, data, len);
  c->out.len += 4 + len;
  return 0;
}

int luamp_chan_start(luamp_chan *c, const void *authkey, size_t keylen) {
  crypto_generichash(c->key, sizeof c->key, authkey, keylen, NULL, 0);
  if (c->role == CH_CLIENT) {
    c->state = CH_WAIT_HELLO;
    return 0;
  }
  uint8_t hello[HELLO_LEN];
  memcpy(hello, MAGIC, 8);
  randombytes_buf(c->nonce_s, sizeof c->nonce_s);
  memcpy(hello + 8, c->nonce_s, LUAMP_AUTH_NONCE);
  c->offer = c->suites;
  hello[8 + LUAMP_AUTH_NONCE] = c->offer;
  c->state = CH_HELLO_SENT;
  return queue_plain(c, hello, sizeof hello);
}

static int fail(luamp_chan *c, int code, const char *why) {
  c->state = CH_BROKEN;
  c->why = why;
  return code;
}

/* One complete frame of len bytes at f (in the receive buffer). */
static int on_frame(luamp_chan *c, uint8_t *f, size_t len, const uint8_t **msg, size_t *mlen) {
  uint8_t mac[32];
  switch (c->state) {
  case CH_AUTHED: {
    if (len < TAG) return fail(c, CH_EPROTO, "sealed frame shorter than its tag");
    uint8_t npub[NPUB];
    frame_nonce(npub, c->rx_ctr);
    int bad = c->suite == LUAMP_SUITE_AESGCM
                  ? crypto_aead_aes256gcm_decrypt_detached_afternm(
                        f, NULL, f, len - TAG, f + len - TAG, f - 4, 4, npub, gcm_rx(c))
                  : crypto_aead_chacha20poly1305_ietf_decrypt_detached(
                        f, NULL, f, len - TAG, f + len - TAG, f - 4, 4, npub, c->rx_key);
    if (bad != 0)
      return fail(c, CH_EAUTH, "a frame failed authentication (forged, replayed or reordered)");
    c->rx_ctr++;
    *msg = f;
    *mlen = len - TAG;
    guard_message(c, f + len - TAG);
    return CH_MSG;
  }
  case CH_HELLO_SENT: {
    if (len != PROOF_LEN) return fail(c, CH_EPROTO, "malformed handshake from the client");
    memcpy(c->nonce_c, f, LUAMP_AUTH_NONCE);
    c->suite = f[LUAMP_AUTH_NONCE];
    handshake_mac(c, "C", mac);
    if (sodium_memcmp(mac, f + LUAMP_AUTH_NONCE + 1, 32) != 0) {
      uint8_t no = 0;
      queue_plain(c, &no, 1);
      luamp_chan_flush(c);
      return fail(c, CH_EAUTH, "the client failed to prove it has the authkey");
    }
    /* a proven client, but its choice must be one suite of those offered */
    if ((c->suite != LUAMP_SUITE_CHACHA && c->suite != LUAMP_SUITE_AESGCM) || !(c->suite & c->offer))
      return fail(c, CH_EPROTO, "the client chose a cipher that was not offered");
    uint8_t verdict[VERDICT_OK_LEN];
    verdict[0] = 1;
    handshake_mac(c, "S", verdict + 1);
    if (queue_plain(c, verdict, sizeof verdict) != 0 || derive_session(c) != 0)
      return fail(c, CH_EIO, "out of memory");
    return CH_DONE_AUTH;
  }
  case CH_WAIT_HELLO: {
    if (len != HELLO_LEN || memcmp(f, MAGIC, 8) != 0)
      return fail(c, CH_EPROTO, "the peer is not a luamp manager");
    memcpy(c->nonce_s, f + 8, LUAMP_AUTH_NONCE);
    c->offer = f[8 + LUAMP_AUTH_NONCE];
    uint8_t common = c->offer & c->suites & SUITES_KNOWN;
    if (!common) return fail(c, CH_EPROTO, "the manager offers no cipher this side runs");
    c->suite = common & LUAMP_SUITE_AESGCM ? LUAMP_SUITE_AESGCM : LUAMP_SUITE_CHACHA;
    randombytes_buf(c->nonce_c, sizeof c->nonce_c);
    uint8_t proof[PROOF_LEN];
    memcpy(proof, c->nonce_c, LUAMP_AUTH_NONCE);
    proof[LUAMP_AUTH_NONCE] = c->suite;
    handshake_mac(c, "C", proof + LUAMP_AUTH_NONCE + 1);
    if (queue_plain(c, proof, sizeof proof) != 0) return fail(c, CH_EIO, "out of memory");
    c->state = CH_WAIT_VERDICT;
    return CH_AGAIN;
  }
  case CH_WAIT_VERDICT: {
    if (len == 1 && f[0] == 0)
      return fail(c, CH_EAUTH, "the manager refused the authkey");
    if (len != VERDICT_OK_LEN || f[0] != 1)
      return fail(c, CH_EPROTO, "malformed handshake from the manager");
    handshake_mac(c, "S", mac);
    if (sodium_memcmp(mac, f + 1, 32) != 0)
      return fail(c, CH_EAUTH, "the manager failed to prove it has the authkey");
    if (derive_session(c) != 0) return fail(c, CH_EIO, "out of memory");
    return CH_DONE_AUTH;
  }
  default:
    return fail(c, CH_EPROTO, "frame in a state that expects none");
  }
}

int luamp_chan_step(luamp_chan *c, const uint8_t **msg, size_t *mlen) {
  if (c->consume) {
    unguard_message(c);
    c->in_start += c->consume;
    c->consume = 0;
    if (c->in_start == c->in_end) c->in_start = c->in_end = 0;
  }
  if (c->state == CH_BROKEN) return CH_EPROTO;
  if (c->state == CH_FRESH) return fail(c, CH_EPROTO, "channel not started");
  for (;;) {
    size_t have = c->in_end - c->in_start, need = 4;
    if (have >= 4) {
      uint32_t len = get_be32(c->in + c->in_start);
      size_t max = c->state == CH_AUTHED ? LUAMP_AUTH_FRAME_MAX : LUAMP_AUTH_PREAUTH_MAX;
      if (len > max) return fail(c, CH_EPROTO, "frame longer than allowed");
      need = 4 + (size_t)len;
      if (have >= need) {
        uint8_t *f = c->in + c->in_start + 4;
        c->consume = need;
        int r = on_frame(c, f, len, msg, mlen);
        if (r != CH_AGAIN) return r;
        /* the client's hello handling queued its proof: go on reading */
        c->in_start += c->consume;
        c->consume = 0;
        if (c->in_start == c->in_end) c->in_start = c->in_end = 0;
        if (luamp_chan_flush(c) < 0) return fail(c, CH_EIO, "send failed");
        continue;
      }
    }
    /* room for the rest of this frame, allocated only as its bytes arrive */
    if (c->in_cap - c->in_start < need && c->in_start > 0) {
      memmove(c->in, c->in + c->in_start, have);
      c->in_start = 0;
      c->in_end = have;
    }
    if (c->in_end == c->in_cap) {
      /* full: double, but never past the frame being read; so what we hold is at most
       * twice what the peer actually sent (plus IN_MIN), whatever its header claimed */
      size_t want = c->in_cap * 2 > IN_MIN ? c->in_cap * 2 : IN_MIN;
      if (want > need && need > c->in_cap) want = need;
      uint8_t *p = realloc(c->in, want);
      if (!p) return fail(c, CH_EIO, "out of memory");
      c->in = p;
      c->in_cap = want;
    }
    ssize_t n = recv(c->fd, c->in + c->in_end, c->in_cap - c->in_end, c->block ? 0 : MSG_DONTWAIT);
    if (n > 0) {
      c->in_end += (size_t)n;
      continue;
    }
    /* a blocking recv cut short by a signal: the caller's wait looks at the Ctrl-C mark */
    if (c->block && errno == EINTR) return CH_AGAIN;
    if (n == 0) {
      c->peer_closed = 1;
      c->why = have ? "the peer closed in the middle of a frame" : "the peer closed the connection";
      return CH_EOF;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return CH_AGAIN;
    if (errno == ECONNRESET) {
      c->why = "the connection was reset";
      return CH_EOF;
    }
    c->why = "receive failed";
    return CH_EIO;
  }
}

int luamp_chan_seal_begin(luamp_chan *c, size_t *mark) {
  if (c->out_off == c->out.len) c->out_off = c->out.len = 0;
  if (luamp_buf_reserve(&c->out, 4 + 256) != 0) return -1;
  *mark = c->out.len;
  c->out.len += 4;
  return 0;
}

void luamp_chan_seal_abort(luamp_chan *c, size_t mark) { c->out.len = mark; }

int luamp_chan_seal_end(luamp_chan *c, size_t mark) {
  size_t plen = c->out.len - mark - 4;
  if (c->state != CH_AUTHED || plen > LUAMP_AUTH_FRAME_MAX - TAG ||
      luamp_buf_reserve(&c->out, TAG) != 0) {
    c->out.len = mark;
    return -1;
  }
  uint8_t *h = (uint8_t *)c->out.data + mark;
  put_be32(h, (uint32_t)(plen + TAG));
  uint8_t npub[NPUB];
  frame_nonce(npub, c->tx_ctr);
  if (c->suite == LUAMP_SUITE_AESGCM)
    crypto_aead_aes256gcm_encrypt_detached_afternm(h + 4, h + 4 + plen, NULL, h + 4, plen, h, 4,
                                                   NULL, npub, gcm_tx(c));
  else
    crypto_aead_chacha20poly1305_ietf_encrypt_detached(h + 4, h + 4 + plen, NULL, h + 4, plen,
                                                       h, 4, NULL, npub, c->tx_key);
  c->tx_ctr++;
  c->out.len += TAG;
  return 0;
}

int luamp_chan_seal(luamp_chan *c, const void *data, size_t len) {
  size_t mark;
  if (luamp_chan_seal_begin(c, &mark) != 0) return -1;
  if (luamp_buf_reserve(&c->out, len) != 0) {
    luamp_chan_seal_abort(c, mark);
    return -1;
  }
  memcpy(c->out.data + c->out.len, data, len);
  c->out.len += len;
  return luamp_chan_seal_end(c, mark);
}

int luamp_chan_flush(luamp_chan *c) {
  while (c->out_off < c->out.len) {
    ssize_t n = send(c->fd, c->out.data + c->out_off, c->out.len - c->out_off,
                     MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) {
      c->out_off += (size_t)n;
      continue;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    return -1;
  }
  c->out_off = c->out.len = 0;
  if (c->out.cap > (4u << 20)) luamp_buf_free(&c->out);     /* a big reply's buffer goes */
  return 1;
}

/* ---- sockets ------------------------------------------------------------------------ */

static void tune_socket(int fd, int family) {
  if (family == AF_INET || family == AF_INET6) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
}

/* Fills a sockaddr_un for path; -1 if it does not fit. */
static int unix_addr(struct sockaddr_un *sa, const char *path, size_t len) {
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  if (len == 0 || len >= sizeof sa->sun_path || memchr(path, 0, len)) return -1;
  memcpy(sa->sun_path, path, len);
  return 0;
}

/* ---- Lua binding -------------------------------------------------------------------- */

typedef struct { luamp_chan c; } chan_ud;
typedef struct { int fd; int family; } listener_ud;

/* Whether value idx has the metatable at upvalue mt (the channel methods and auth_poll
 * hold both metatables as upvalues: a pointer comparison, where luaL_testudata looked
 * the name up in the registry, a few hundred instructions per call). */
static int has_mt(lua_State *L, int idx, int mt) {
  if (lua_type(L, idx) != LUA_TUSERDATA || !lua_getmetatable(L, idx)) return 0;
  int eq = lua_topointer(L, -1) == lua_topointer(L, lua_upvalueindex(mt));
  lua_pop(L, 1);
  return eq;
}

/* (only in functions registered with the metatables as upvalues 1 and 2) */
static chan_ud *check_chan(lua_State *L, int idx) {
  if (!has_mt(L, idx, 1)) luaL_typeerror(L, idx, CHAN_MT);
  chan_ud *u = lua_touserdata(L, idx);
  if (u->c.fd < 0) luamp_raise(L, "Closed", "manager connection is closed");
  return u;
}

static chan_ud *push_chan(lua_State *L, int fd, int role) {
  chan_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  luamp_chan_init(&u->c, -1, role);
  luaL_setmetatable(L, CHAN_MT);
  u->c.fd = fd;
  return u;
}

static void raise_wait(lua_State *L, int rc) {
  if (rc == -2) {
    luamp_take_interrupt();
    luamp_raise(L, "Interrupted", "interrupted");
  }
  luamp_raise_errno(L, "Value", "wait", errno);
}

/* _core.auth_listen(host, port) or (path) -> listener */
static int l_listen(lua_State *L) {
  lua_settop(L, 2);
  listener_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->fd = -1;
  luaL_setmetatable(L, LISTENER_MT);
  size_t hl;
  const char *host = luaL_checklstring(L, 1, &hl);
  int fd = -1, err = 0;
  if (lua_isnoneornil(L, 2)) {
    struct sockaddr_un sa;
    if (unix_addr(&sa, host, hl) != 0) luamp_raise(L, "Value", "manager address: bad socket path");
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) luamp_raise_errno(L, "Value", "socket", errno);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 128) != 0) {
      err = errno;
      luamp_close_fd(fd);
      luamp_raise(L, "Value", "cannot listen on %s: %s", host, strerror(err));
    }
    u->fd = fd;
    u->family = AF_UNIX;
    return 1;
  }
  lua_Integer port = luaL_checkinteger(L, 2);
  if (port < 0 || port > 65535) luamp_raise(L, "Value", "manager address: bad port %lld", (long long)port);
  char ports[16];
  snprintf(ports, sizeof ports, "%d", (int)port);
  struct addrinfo hints = {0}, *res = NULL;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  int gai = getaddrinfo(hl ? host : NULL, ports, &hints, &res);
  if (gai != 0) luamp_raise(L, "Value", "manager address %s: %s", host, gai_strerror(gai));
  for (struct addrinfo *a = res; a; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) { err = errno; continue; }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 128) == 0) {
      u->family = a->ai_family;
      break;
    }
    err = errno;
    luamp_close_fd(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0) luamp_raise(L, "Value", "cannot listen on %s:%d: %s", host, (int)port, strerror(err));
  u->fd = fd;
  return 1;
}

static listener_ud *check_listener(lua_State *L) {
  listener_ud *u = luaL_checkudata(L, 1, LISTENER_MT);
  if (u->fd < 0) luamp_raise(L, "Closed", "listener is closed");
  return u;
}

/* listener:address() -> host, port (TCP) or path (Unix) */
static int l_listener_address(lua_State *L) {
  listener_ud *u = check_listener(L);
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  if (getsockname(u->fd, (struct sockaddr *)&ss, &sl) != 0) luamp_raise_errno(L, "Value", "getsockname", errno);
  char host[NI_MAXHOST], port[NI_MAXSERV];
  if (ss.ss_family == AF_UNIX) {
    struct sockaddr_un *sa = (struct sockaddr_un *)&ss;
    lua_pushstring(L, sa->sun_path);
    return 1;
  }
  if (getnameinfo((struct sockaddr *)&ss, sl, host, sizeof host, port, sizeof port,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    luamp_raise(L, "Value", "getnameinfo failed");
  lua_pushstring(L, host);
  lua_pushinteger(L, atoi(port));
  return 2;
}

/* listener:accept() -> a server channel, or nil when nobody is waiting */
static int l_listener_accept(lua_State *L) {
  listener_ud *u = check_listener(L);
  for (;;) {
    int fd = accept4(u->fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      tune_socket(fd, u->family);
      push_chan(L, fd, CH_SERVER);
      return 1;
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    /* EMFILE and the like: the caller retries later */
    luamp_raise_errno(L, "Value", "accept", errno);
  }
}

static int l_listener_fileno(lua_State *L) {
  lua_pushinteger(L, check_listener(L)->fd);
  return 1;
}

static int l_listener_close(lua_State *L) {
  listener_ud *u = luaL_checkudata(L, 1, LISTENER_MT);
  if (u->fd >= 0) luamp_close_fd(u->fd);
  u->fd = -1;
  return 0;
}

/* _core.auth_connect(host, port, [timeout]) or (path, nil, [timeout]) -> client channel
 * (connected, not yet authenticated). A refused or unreachable manager: BrokenPipe. */
static int l_connect(lua_State *L) {
  size_t hl;
  const char *host = luaL_checklstring(L, 1, &hl);
  double deadline = luamp_deadline_arg(L, 3);
  lua_settop(L, 3);
  chan_ud *u = push_chan(L, -1, CH_CLIENT);
  struct sockaddr_storage ss;
  socklen_t sl;
  int family;
  if (lua_isnoneornil(L, 2)) {
    struct sockaddr_un *sa = (struct sockaddr_un *)&ss;
    if (unix_addr(sa, host, hl) != 0) luamp_raise(L, "Value", "manager address: bad socket path");
    sl = sizeof *sa;
    family = AF_UNIX;
  } else {
    lua_Integer port = luaL_checkinteger(L, 2);
    if (port <= 0 || port > 65535) luamp_raise(L, "Value", "manager address: bad port %lld", (long long)port);
    char ports[16];
    snprintf(ports, sizeof ports, "%d", (int)port);
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int gai = getaddrinfo(host, ports, &hints, &res);
    if (gai != 0) luamp_raise(L, "Value", "manager address %s: %s", host, gai_strerror(gai));
    memcpy(&ss, res->ai_addr, res->ai_addrlen);
    sl = res->ai_addrlen;
    family = res->ai_family;
    freeaddrinfo(res);
  }
  int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) luamp_raise_errno(L, "Value", "socket", errno);
  u->c.fd = fd;                                 /* owned by the userdata from here */
  tune_socket(fd, family);
  int rc;
  do rc = connect(fd, (struct sockaddr *)&ss, sl); while (rc != 0 && errno == EINTR);
  int err = rc == 0 ? 0 : errno;
  if (err == EINPROGRESS || err == EAGAIN) {
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int w = luamp_wait_fds(&p, 1, deadline);
    if (w < 0) raise_wait(L, w);
    if (w == 0) luamp_raise(L, "Timeout", "connecting to the manager timed out");
    socklen_t el = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) != 0) err = errno;
  }
  if (err) luamp_raise(L, "BrokenPipe", "cannot connect to the manager at %s: %s", host, strerror(err));
  return 1;
}

static int raise_step(lua_State *L, luamp_chan *c, int r) {
  const char *why = c->why ? c->why : "protocol error";
  switch (r) {
  case CH_EOF: luamp_raise(L, "EOF", "manager connection: %s", why);
  case CH_EAUTH: luamp_raise(L, "Auth", "%s", why);
  case CH_EIO: luamp_raise(L, "BrokenPipe", "manager connection: %s: %s", why, strerror(errno));
  default: luamp_raise(L, "Value", "manager connection: %s", why);
  }
}

/* Decodes the message of a CH_MSG step (pushes it) or raises Serialize. */
static void push_message(lua_State *L, const uint8_t *msg, size_t len) {
  if (luamp_decodex(L, (const char *)msg, len, 0) != 0) lua_error(L);
}

static void flush_or_raise(lua_State *L, luamp_chan *c) {
  if (luamp_chan_flush(c) < 0) {
    int err = errno;
    luamp_raise(L, err == EPIPE || err == ECONNRESET ? "BrokenPipe" : "Value",
                "manager connection: send failed: %s", strerror(err));
  }
}

/* ---- plain vectors (see the header) ---- */

/* Whether the `n` values from idx are all plain (nil, boolean, number, string). */
static int all_plain(lua_State *L, int idx, int n) {
  if (n > VEC_MAX) return 0;
  for (int i = 0; i < n; i++) {
    int t = lua_type(L, idx + i);
    if (t != LUA_TNIL && t != LUA_TBOOLEAN && t != LUA_TNUMBER && t != LUA_TSTRING) return 0;
  }
  return 1;
}

static void put_u64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_u64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
  return v;
}

/* Seals the `n` plain values from idx as one vector frame (all_plain said so). */
static void seal_vector(lua_State *L, luamp_chan *c, int idx, int n) {
  if (c->state != CH_AUTHED) luamp_raise(L, "Value", "manager connection is not authenticated");
  size_t mark;
  if (luamp_chan_seal_begin(c, &mark) != 0) luamp_raise(L, "Value", "out of memory");
  luamp_buf *b = &c->out;
  for (int i = -1; i < n; i++) {
    size_t len = 0;
    const char *str = NULL;
    if (i >= 0 && lua_type(L, idx + i) == LUA_TSTRING) str = lua_tolstring(L, idx + i, &len);
    if (len > LUAMP_AUTH_FRAME_MAX || luamp_buf_reserve(b, 16 + len) != 0) {
      luamp_chan_seal_abort(c, mark);
      luamp_raise(L, "Value", "message too large for a manager call");
    }
    uint8_t *p = (uint8_t *)b->data + b->len;
    if (i < 0) {
      p[0] = VEC_TAG;
      p[1] = (uint8_t)n;
      b->len += 2;
      continue;
    }
    switch (lua_type(L, idx + i)) {
    case LUA_TNIL: p[0] = V_NIL; b->len += 1; break;
    case LUA_TBOOLEAN: p[0] = lua_toboolean(L, idx + i) ? V_TRUE : V_FALSE; b->len += 1; break;
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx + i)) {
        p[0] = V_INT;
        put_u64(p + 1, (uint64_t)lua_tointeger(L, idx + i));
      } else {
        double d = (double)lua_tonumber(L, idx + i);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        p[0] = V_FLOAT;
        put_u64(p + 1, bits);
      }
      b->len += 9;
      break;
    default:
      p[0] = V_STR;
      put_u64(p + 1, (uint64_t)len);
      memcpy(p + 9, str, len);
      b->len += 9 + len;
    }
  }
  if (luamp_chan_seal_end(c, mark) != 0) luamp_raise(L, "Value", "message too large for a manager call");
}

/* Pushes the values of a vector payload (untrusted bytes, though from an authenticated
 * peer: every count, tag and length is checked against the end) and returns how many;
 * raises Serialize on anything malformed, as the codec's decoding does (the server then
 * answers the request with that error and keeps the connection). */
static int push_vector(lua_State *L, const uint8_t *msg, size_t len) {
  if (len < 2 || msg[0] != VEC_TAG || msg[1] > VEC_MAX)
    luamp_raise(L, "Serialize", "manager connection: malformed vector");
  int n = msg[1];
  luaL_checkstack(L, n + 4, "manager vector");
  const uint8_t *p = msg + 2, *end = msg + len;
  for (int i = 0; i < n; i++) {
    if (p >= end) goto bad;
    uint8_t tag = *p++;
    switch (tag) {
    case V_NIL: lua_pushnil(L); break;
    case V_FALSE: lua_pushboolean(L, 0); break;
    case V_TRUE: lua_pushboolean(L, 1); break;
    case V_INT: case V_FLOAT: case V_STR: {
      if ((size_t)(end - p) < 8) goto bad;
      uint64_t v = get_u64(p);
      p += 8;
      if (tag == V_INT) {
        lua_pushinteger(L, (lua_Integer)v);
      } else if (tag == V_FLOAT) {
        double d;
        memcpy(&d, &v, 8);
        lua_pushnumber(L, (lua_Number)d);
      } else {
        if (v > (uint64_t)(end - p)) goto bad;
        lua_pushlstring(L, (const char *)p, (size_t)v);
        p += v;
      }
      break;
    }
    default: goto bad;
    }
  }
  if (p != end) goto bad;
  return n;
bad:
  luamp_raise(L, "Serialize", "manager connection: malformed vector");
}

/* chan:start(authkey): the server queues its hello (call flush/poll to send it). */
static int l_chan_start(lua_State *L) {
  chan_ud *u = check_chan(L, 1);
  size_t kl;
  const char *key = luaL_checklstring(L, 2, &kl);
  if (u->c.state != CH_FRESH) luamp_raise(L, "Value", "channel already started");
  if (luamp_chan_start(&u->c, key, kl) != 0) luamp_raise(L, "Value", "out of memory");
  if (luamp_chan_flush(&u->c) < 0) luamp_raise(L, "BrokenPipe", "manager connection: send failed");
  return 0;
}

/* Whether a whole frame is already in the receive buffer (after the last one handed out). */
static int frame_buffered(const luamp_chan *c) {
  size_t start = c->in_start + c->consume, have = c->in_end - start;
  return have >= 4 && have - 4 >= get_be32(c->in + start);
}

/* Pushes a request vector {id, method, args...} as the server's request table
 * {id, method, nargs, args...}. */
static void push_request(lua_State *L, const uint8_t *msg, size_t len) {
  int top = lua_gettop(L);
  int n = push_vector(L, msg, len);
  if (n < 2) luamp_raise(L, "Serialize", "manager connection: malformed request");
  lua_createtable(L, n + 1, 0);
  lua_insert(L, top + 1);
  for (int i = n; i >= 3; i--) lua_rawseti(L, top + 1, i + 1);
  lua_pushinteger(L, n - 2);
  lua_rawseti(L, top + 1, 3);
  lua_rawseti(L, top + 1, 2);
  lua_rawseti(L, top + 1, 1);
}

/* One step of chan:step and chan:receive: reads what has come, sends what is pending.
 * Returns 0 (nothing complete), 1 ("auth" pushed: handshake done) or -1 (a message, in
 * msg and len); raises on a broken or refused channel. */
static int chan_advance(lua_State *L, chan_ud *u, const uint8_t **msg, size_t *len) {
  int r = luamp_chan_step(&u->c, msg, len);
  if (u->c.state != CH_BROKEN && luamp_chan_pending(&u->c)) luamp_chan_flush(&u->c);
  if (r == CH_AGAIN) return 0;
  if (r == CH_DONE_AUTH) {
    lua_pushliteral(L, "auth");
    return 1;
  }
  if (r == CH_MSG) return -1;
  return raise_step(L, &u->c, r);
}

/* chan:step([buffered_only]) -> nil (nothing complete), "auth" (handshake done), or
 * "msg", value. buffered_only: look only at frames already received (no recv call). */
static int l_chan_step(lua_State *L) {
  chan_ud *u = check_chan(L, 1);
  if (lua_toboolean(L, 2) && !frame_buffered(&u->c)) return 0;
  const uint8_t *msg;
  size_t len;
  int n = chan_advance(L, u, &msg, &len);
  if (n >= 0) return n;
  lua_pushliteral(L, "msg");
  if (len > 0 && msg[0] == VEC_TAG) push_request(L, msg, len);
  else push_message(L, msg, len);
  return 2;
}

/* chan:receive([buffered_only]) -> as step, except that a request vector comes as
 * "req", id, method, args... (no table: the server's fast path runs it from there).
 * Without buffered_only, output still pending is sent first (raises if that fails). */
static int l_chan_receive(lua_State *L) {
  chan_ud *u = check_chan(L, 1);
  if (lua_toboolean(L, 2)) {
    if (!frame_buffered(&u->c)) return 0;
  } else if (luamp_chan_pending(&u->c) && luamp_chan_flush(&u->c) < 0) {
    flush_or_raise(L, &u->c);
  }
  const uint8_t *msg;
  size_t len;
  int n = chan_advance(L, u, &msg, &len);
  if (n >= 0) return n;
  lua_settop(L, 1);
  if (len > 0 && msg[0] == VEC_TAG) {
    lua_pushliteral(L, "req");
    n = push_vector(L, msg, len);
    if (n < 2) luamp_raise(L, "Serialize", "manager connection: malformed request");
    return 1 + n;
  }
  lua_pushliteral(L, "msg");
  push_message(L, msg, len);
  return 2;
}

/* Waits until the channel can read (and write, with output pending). */
static void wait_chan(lua_State *L, luamp_chan *c, double deadline, const char *what) {
  struct pollfd p = {.fd = c->fd, .events = POLLIN | (luamp_chan_pending(c) ? POLLOUT : 0)};
  int w = luamp_wait_fds(&p, 1, deadline);
  if (w < 0) raise_wait(L, w);
  if (w == 0) luamp_raise(L, "Timeout", "%s timed out", what);
}

/* chan:handshake(authkey, [timeout]): the client side, blocking. Auth on a wrong key, EOF
 * if the manager closes without a verdict. */
static int l_chan_handshake(lua_State *L) {
  chan_ud *u = check_chan(L, 1);
  size_t kl;
  const char *key = luaL_checklstring(L, 2, &kl);
  double deadline = luamp_deadline_arg(L, 3);
  if (u->c.role != CH_CLIENT || u->c.state != CH_FRESH) luamp_raise(L, "Value", "bad handshake state");
  luamp_chan_start(&u->c, key, kl);
  for (;;) {
    const uint8_t *msg;
    size_t len;
    int r = luamp_chan_step(&u->c, &msg, &len);
    if (r == CH_DONE_AUTH) break;
    if (r == CH_MSG) luamp_raise(L, "Value", "manager spoke before the handshake ended");
    /* a refusal is said (verdict 0: Auth, from the step); a bare close is a manager that
     * stopped meanwhile, which every later call would meet as EOF too */
    if (r == CH_EOF && u->c.state == CH_WAIT_VERDICT)
      luamp_raise(L, "EOF", "manager connection: the manager closed the connection during the handshake");
    if (r != CH_AGAIN) raise_step(L, &u->c, r);
    wait_chan(L, &u->c, deadline, "manager handshake");
  }
  return 0;
}

/* Seals value idx into c's output. */
static void seal_value(lua_State *L, luamp_chan *c, int idx) {
  if (c->state != CH_AUTHED) luamp_raise(L, "Value", "manager connection is not authenticated");
  size_t mark;
  if (luamp_chan_seal_begin(c, &mark) != 0) luamp_raise(L, "Value", "out of memory");
  if (luamp_encodex(L, idx, &c->out, "value") != 0) {
    luamp_chan_seal_abort(c, mark);
    lua_error(L);
  }
  if (luamp_chan_seal_end(c, mark) != 0) luamp_raise(L, "Value", "message too large for a manager call");
}

/* Sends what the channel holds, as far as the socket takes it now; pushes whether all
 * of it went out (the rest goes with flush). Raises if the connection failed. */
static int push_flushed(lua_State *L, chan_ud *u) {
  int r = luamp_chan_flush(&u->c);
  if (r < 0) flush_or_raise(L, &u->c);
  lua_pushboolean(L, r == 1);
  return 1;
}

/* chan:send(value) -> true if all of it went out now (the rest goes with flush) */
static int l_chan_send(lua_State *L) {
  chan_ud *u = check_chan(L, 1);
  seal_value(L, &u->c, 2);
  return push_flushed(L, u);
}

static int l_chan_flush(lua_State *L) {
  chan_ud *u = check_chan(L, 1);
  return push_flushed(L, u);
}

/* A client's call outside any task, with no pump to serve and no timeout, waits for its
 * reply in recv itself: one system call where poll + recv made two, as for a Pipe
 * (connection.c). The socket is made blocking once (every other call on it passes
 * MSG_DONTWAIT) with SO_RCVTIMEO at LUAMP_WAIT_SLICE: the kernel sleeps no longer than a
 * slice and never restarts the recv after a signal handler, so Ctrl-C still wins (the
 * EINTR, or a slice that passed, hands over to wait_chan and luamp_wait_fds). */
static int direct_reply_ok(luamp_chan *c, double deadline) {
  if (deadline >= 0 || c->role != CH_CLIENT || luamp_chan_pending(c) || !luamp_wait_is_plain() ||
      luamp_interrupt_pending())
    return 0;
  if (c->blocking_ok == 0) {
    struct timeval tv = {.tv_sec = 0, .tv_usec = (suseconds_t)(LUAMP_WAIT_SLICE * 1e6)};
    int fl = fcntl(c->fd, F_GETFL);
    c->blocking_ok = fl >= 0 && setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0 &&
                     fcntl(c->fd, F_SETFL, fl & ~O_NONBLOCK) == 0 ? 1 : -1;
  }
  return c->blocking_ok == 1;
}

/* Waits for the reply to the request just queued (a client's round trip, blocking) and
 * returns its payload. */
static void await_reply(lua_State *L, chan_ud *u, double deadline, const uint8_t **msg,
                        size_t *len) {
  if (luamp_chan_flush(&u->c) < 0) flush_or_raise(L, &u->c);
  /* the reply cannot be here before the request went: wait first, then read (one recv
   * per reply instead of a wasted one), unless a frame is buffered already */
  int waited = frame_buffered(&u->c);
  int direct = !waited && direct_reply_ok(&u->c, deadline);
  for (;;) {
    if (!waited && !direct) wait_chan(L, &u->c, deadline, "manager call");
    waited = 0;
    if (luamp_chan_pending(&u->c) && luamp_chan_flush(&u->c) < 0) flush_or_raise(L, &u->c);
    u->c.block = direct;
    int r = luamp_chan_step(&u->c, msg, len);
    u->c.block = direct = 0;
    if (r == CH_MSG) return;
    if (r != CH_AGAIN) raise_step(L, &u->c, r);
  }
}

/* chan:call(value, [timeout]) -> reply: the client's round trip, blocking. */
static int l_chan_call(lua_State *L) {
  chan_ud *u = check_chan(L, 1);
  double deadline = luamp_deadline_arg(L, 3);
  seal_value(L, &u->c, 2);
  const uint8_t *msg;
  size_t len;
  await_reply(L, u, deadline, &msg, &len);
  push_message(L, msg, len);
  return 1;
}

/* chan:request(id, method, ...) -> true, results... (a reply vector: the call succeeded
 * with plain results) or the reply table {true, n, results...} / {false, error}. The
 * request goes as a vector when its values are all plain, else as the table
 * {id, method, nargs, args...}. */
static int l_chan_request(lua_State *L) {
  chan_ud *u = check_chan(L, 1);
  int top = lua_gettop(L);
  if (top < 3) luamp_raise(L, "Value", "request: id and method expected");
  if (all_plain(L, 2, top - 1)) {
    seal_vector(L, &u->c, 2, top - 1);
  } else {
    lua_createtable(L, top, 0);
    for (int i = 2; i <= top; i++) {
      lua_pushvalue(L, i);
      lua_rawseti(L, -2, i < 4 ? i - 1 : i);
    }
    lua_pushinteger(L, top - 3);
    lua_rawseti(L, -2, 3);
    seal_value(L, &u->c, -1);
    lua_settop(L, top);
  }
  const uint8_t *msg;
  size_t len;
  await_reply(L, u, -1, &msg, &len);
  if (len > 0 && msg[0] == VEC_TAG) {
    lua_pushboolean(L, 1);
    return 1 + push_vector(L, msg, len);
  }
  push_message(L, msg, len);
  return 1;
}

/* chan:send_reply(reply) -> as send; a reply {true, n, results...} whose results are all
 * plain goes as a vector. */
static int l_chan_send_reply(lua_State *L) {
  chan_ud *u = check_chan(L, 1);
  int vec = 0;
  lua_Integer n = 0;
  if (lua_type(L, 2) == LUA_TTABLE && lua_rawgeti(L, 2, 1) == LUA_TBOOLEAN && lua_toboolean(L, -1)) {
    lua_pop(L, 1);
    if (lua_rawgeti(L, 2, 2) == LUA_TNUMBER && lua_isinteger(L, -1)) n = lua_tointeger(L, -1);
    vec = n >= 0 && n <= VEC_MAX && lua_checkstack(L, (int)n + 4);
    lua_pop(L, 1);
    if (vec) {
      for (lua_Integer i = 0; i < n; i++) lua_rawgeti(L, 2, i + 3);
      vec = all_plain(L, lua_gettop(L) - (int)n + 1, (int)n);
    }
  }
  if (vec) seal_vector(L, &u->c, lua_gettop(L) - (int)n + 1, (int)n);
  else seal_value(L, &u->c, 2);
  return push_flushed(L, u);
}

/* chan:reply(results...) -> as send, for the results of a call that succeeded: a vector
 * when they are all plain, else the reply table {true, n, results...}. */
static int l_chan_reply(lua_State *L) {
  chan_ud *u = check_chan(L, 1);
  int n = lua_gettop(L) - 1;
  if (all_plain(L, 2, n)) {
    seal_vector(L, &u->c, 2, n);
  } else {
    lua_createtable(L, n + 2, 0);
    lua_pushboolean(L, 1);
    lua_rawseti(L, -2, 1);
    lua_pushinteger(L, n);
    lua_rawseti(L, -2, 2);
    for (int i = 0; i < n; i++) {
      lua_pushvalue(L, 2 + i);
      lua_rawseti(L, -2, 3 + i);
    }
    seal_value(L, &u->c, -1);
  }
  return push_flushed(L, u);
}

static int l_chan_fileno(lua_State *L) {
  lua_pushinteger(L, check_chan(L, 1)->c.fd);
  return 1;
}

/* chan:buffered() -> whether a whole frame is received and not yet handed out */
static int l_chan_buffered(lua_State *L) {
  lua_pushboolean(L, frame_buffered(&check_chan(L, 1)->c));
  return 1;
}

static int l_chan_pending(lua_State *L) {
  lua_pushboolean(L, luamp_chan_pending(&check_chan(L, 1)->c));
  return 1;
}

static int l_chan_authed(lua_State *L) {
  lua_pushboolean(L, check_chan(L, 1)->c.state == CH_AUTHED);
  return 1;
}

static int l_chan_close(lua_State *L) {
  chan_ud *u = luaL_checkudata(L, 1, CHAN_MT);
  luamp_chan_free(&u->c);
  return 0;
}

/* _core.auth_poll(items, [timeout], [out]) -> {index, ...} of the items ready (in out,
 * refilled and ended by a nil, when given: the server's loop makes no table per call),
 * and how many.
 * Items are channels (readable, or writable while they have output pending), listeners
 * and integer fds (readable). */
static int l_poll(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  double deadline = luamp_deadline_arg(L, 2);
  lua_Integer n = luaL_len(L, 1);
  if (n < 0 || n > 65536) luamp_raise(L, "Value", "cannot poll %lld objects", (long long)n);
  /* a server with a few connections polls from the C stack (no garbage per call) */
  struct pollfd few[16];
  struct pollfd *fds = n <= 16 ? few : lua_newuserdatauv(L, sizeof *fds * (size_t)n, 0);
  for (lua_Integer i = 0; i < n; i++) {
    lua_geti(L, 1, i + 1);
    fds[i].events = POLLIN;
    fds[i].revents = 0;
    if (lua_isinteger(L, -1)) {
      fds[i].fd = (int)lua_tointeger(L, -1);
    } else if (has_mt(L, -1, 1)) {
      chan_ud *u = lua_touserdata(L, -1);
      fds[i].fd = u->c.fd;
      if (luamp_chan_pending(&u->c)) fds[i].events |= POLLOUT;
    } else if (has_mt(L, -1, 2)) {
      listener_ud *u = lua_touserdata(L, -1);
      fds[i].fd = u->fd;
    } else {
      luaL_error(L, "auth_poll: item %d is not a channel, listener or fd", (int)(i + 1));
    }
    lua_pop(L, 1);
  }
  int rc = luamp_wait_fds(fds, (int)n, deadline);
  if (rc < 0) raise_wait(L, rc);
  if (lua_type(L, 3) == LUA_TTABLE) lua_pushvalue(L, 3);     /* (fds may live on the stack) */
  else lua_createtable(L, rc > 0 ? rc : 0, 0);
  int k = 0;
  for (lua_Integer i = 0; i < n; i++) {
    if (fds[i].revents) {
      lua_pushinteger(L, i + 1);
      lua_rawseti(L, -2, ++k);
    }
  }
  lua_pushnil(L);
  lua_rawseti(L, -2, k + 1);
  lua_pushinteger(L, k);
  return 2;
}

/* _core.random_bytes(n) -> string of n random bytes (authkeys) */
static int l_random_bytes(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  if (n < 0 || n > 4096) luamp_raise(L, "Value", "random_bytes: bad length");
  luaL_Buffer b;
  randombytes_buf(luaL_buffinitsize(L, &b, (size_t)n), (size_t)n);
  luaL_pushresultsize(&b, (size_t)n);
  return 1;
}

/* _core.auth_ignore_sigint(): a manager's server process, like Python's, is not stopped
 * by the Ctrl-C meant for the program (its owner shuts it down). */
static int l_ignore_sigint(lua_State *L) {
  (void)L;
  signal(SIGINT, SIG_IGN);
  luamp_take_interrupt();
  return 0;
}

/* _core.auth_forks() -> how many forks this process has made through luamp_fork (counted
 * in the prepare hook, so a child starts from its parent's count too). A manager proxy
 * made before the latest fork has a copy in the child: manager.lua never releases it. */
static lua_Integer forks_made;
static void count_fork(void) { forks_made++; }
static int l_forks(lua_State *L) {
  lua_pushinteger(L, forks_made);
  return 1;
}

static int l_unlink(lua_State *L) {
  unlink(luaL_checkstring(L, 1));
  return 0;
}

int luamp_open_auth(lua_State *L) {
  if (sodium_init() < 0) luaL_error(L, "libsodium failed to initialise");
  luamp_atfork(count_fork, NULL, NULL);
  static const luaL_Reg chan_methods[] = {
    {"start", l_chan_start}, {"step", l_chan_step}, {"handshake", l_chan_handshake},
    {"send", l_chan_send}, {"flush", l_chan_flush}, {"call", l_chan_call},
    {"request", l_chan_request}, {"send_reply", l_chan_send_reply},
    {"receive", l_chan_receive}, {"reply", l_chan_reply},
    {"fileno", l_chan_fileno}, {"pending", l_chan_pending}, {"buffered", l_chan_buffered},
    {"authed", l_chan_authed},
    {"close", l_chan_close}, {NULL, NULL}};
  static const luaL_Reg listener_methods[] = {
    {"address", l_listener_address}, {"accept", l_listener_accept},
    {"fileno", l_listener_fileno}, {"close", l_listener_close}, {NULL, NULL}};
  if (luaL_newmetatable(L, LISTENER_MT)) {
    luaL_newlib(L, listener_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_listener_close);
    lua_setfield(L, -2, "__gc");
  }
  int lmt = lua_gettop(L);
  int fresh = luaL_newmetatable(L, CHAN_MT);
  int cmt = lua_gettop(L);
  /* the channel methods and auth_poll hold both metatables (check_chan, has_mt) */
  if (fresh) {
    luaL_newlibtable(L, chan_methods);
    lua_pushvalue(L, cmt);
    lua_pushvalue(L, lmt);
    luaL_setfuncs(L, chan_methods, 2);
    lua_setfield(L, cmt, "__index");
    lua_pushcfunction(L, l_chan_close);
    lua_setfield(L, cmt, "__gc");
  }
  static const luaL_Reg fns[] = {
    {"auth_listen", l_listen}, {"auth_connect", l_connect},
    {"auth_ignore_sigint", l_ignore_sigint}, {"auth_unlink", l_unlink},
    {"random_bytes", l_random_bytes}, {"auth_forks", l_forks}, {NULL, NULL}};
  lua_pushvalue(L, cmt);
  lua_pushvalue(L, lmt);
  lua_pushcclosure(L, l_poll, 2);
  lua_setfield(L, lmt - 1, "auth_poll");
  lua_pop(L, 2);
  luaL_setfuncs(L, fns, 0);
  return 0;
}
