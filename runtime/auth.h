/*
 * auth.h — the C surface of auth.c (authenticated framed channels for managers), shared
 * with its Lua binding, the C test and the fuzzer.
 */
#ifndef LUAMP_AUTH_H
#define LUAMP_AUTH_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

#define LUAMP_AUTH_NONCE 32
#define LUAMP_AUTH_KEY 32
#define LUAMP_AUTH_PREAUTH_MAX (64 * 1024)     /* largest frame read before authentication */
#define LUAMP_AUTH_FRAME_MAX (1u << 30)        /* largest frame read after it */

/* Session ciphers (bits of the server's offer; the client's choice is one of them). */
#define LUAMP_SUITE_CHACHA 1                   /* ChaCha20-Poly1305: every build */
#define LUAMP_SUITE_AESGCM 2                   /* AES-256-GCM: CPUs with AES-NI and CLMUL */

enum { CH_CLIENT = 0, CH_SERVER = 1 };
enum {
  CH_FRESH,          /* nothing done yet */
  CH_HELLO_SENT,     /* server: sent its nonce, waits for the client's proof */
  CH_WAIT_HELLO,     /* client: waits for the server's nonce */
  CH_WAIT_VERDICT,   /* client: sent its proof, waits for the server's */
  CH_AUTHED,         /* session keys in place: every frame is sealed */
  CH_BROKEN          /* a protocol or authentication failure: nothing more is read */
};

/* Results of luamp_chan_step. */
#define CH_AGAIN 0        /* needs more bytes from the socket */
#define CH_DONE_AUTH 1    /* the handshake just completed */
#define CH_MSG 2          /* a message: *msg, *len (valid until the next step) */
#define CH_EOF (-1)       /* the peer closed (cleanly between frames or not) */
#define CH_EAUTH (-2)     /* authentication failed (wrong key, forged or replayed frame) */
#define CH_EPROTO (-3)    /* the peer does not speak the protocol (bad magic, sizes) */
#define CH_EIO (-4)       /* a socket error: errno */

typedef struct luamp_chan {
  int fd;
  int role, state;
  uint8_t key[LUAMP_AUTH_KEY];                   /* hash of the authkey */
  uint8_t nonce_s[LUAMP_AUTH_NONCE], nonce_c[LUAMP_AUTH_NONCE];
  uint8_t tx_key[LUAMP_AUTH_KEY], rx_key[LUAMP_AUTH_KEY];
  uint64_t tx_ctr, rx_ctr;                       /* per-direction frame numbers */
  uint8_t suites;                                /* the ciphers this side runs (a test may narrow it) */
  uint8_t offer, suite;                          /* the server's offer, the suite chosen */
  void *gcm;                                     /* AES suite: expanded tx and rx keys (2 states) */
  /* input: bytes [in_start, in_end) of in are received and not yet consumed */
  uint8_t *in;
  size_t in_start, in_end, in_cap;
  size_t consume;                                /* bytes of the last frame handed out */
  int peer_closed;
  /* output: sealed frames waiting to be written, [out_off, out.len) */
  luamp_buf out;
  size_t out_off;
  const char *why;                               /* text for the last failure */
  int block;                                     /* this step's recv may block (a client's call) */
  int blocking_ok;                               /* 1: fd made blocking with SO_RCVTIMEO; -1: could not */
} luamp_chan;

/* A channel over fd (non-blocking, owned by the channel from now on). */
void luamp_chan_init(luamp_chan *c, int fd, int role);
void luamp_chan_free(luamp_chan *c);             /* closes the fd; idempotent */
/* Sets the shared secret (any bytes) and, for a server, queues its hello. */
int luamp_chan_start(luamp_chan *c, const void *authkey, size_t keylen);
/* Reads what the socket has (without blocking) and advances: the handshake, or the
 * next sealed frame. */
int luamp_chan_step(luamp_chan *c, const uint8_t **msg, size_t *len);
/* Sealing a frame in place: begin reserves its header in c->out and returns where it
 * starts; the caller appends the plaintext to c->out; end encrypts it there and appends
 * the tag (0), or drops the frame (-1: too large, ENOMEM). abort drops it. */
int luamp_chan_seal_begin(luamp_chan *c, size_t *mark);
int luamp_chan_seal_end(luamp_chan *c, size_t mark);
void luamp_chan_seal_abort(luamp_chan *c, size_t mark);
/* One sealed frame holding the len bytes at data: 0, or -1. */
int luamp_chan_seal(luamp_chan *c, const void *data, size_t len);
/* Writes queued output without blocking: 1 all written, 0 some left, -1 errno. */
int luamp_chan_flush(luamp_chan *c);
static inline int luamp_chan_pending(const luamp_chan *c) { return c->out_off < c->out.len; }

#endif
