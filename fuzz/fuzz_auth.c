/*
 * fuzz_auth.c — libFuzzer target for the manager's frame reader and handshake (auth.c).
 *
 * The first input byte picks who the fuzzer plays, the rest is what it sends:
 *   0: an unauthenticated client talking to a server channel;
 *   1: a server talking to a client channel (a fake manager);
 *   2: a man in the middle of an authenticated session: one genuine sealed frame, then
 *      the input (which may replay or alter it), to the server channel.
 * The same byte picks the ciphers the channels run ((byte / 3) % 3 + 1: ChaCha20-Poly1305,
 * AES-256-GCM where the CPU runs it, or both), so each suite's opening is fuzzed.
 * Properties checked besides memory safety: without the key nobody authenticates (0, 1);
 * in 2 exactly the genuine frame opens and nothing else does (a replayed copy fails);
 * the receive buffer never outgrows what was actually received (twice over, plus its
 * first 16 KiB) whatever a length prefix claims; nothing is ever decoded here.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <sodium.h>

#include "auth.h"

static const char key[] = "fuzz key";

static void drain(int fd) {
  char junk[4096];
  while (recv(fd, junk, sizeof junk, MSG_DONTWAIT) > 0) {}
}

/* Feeds data to `c` through the socket `peer`, stepping c as it goes. Returns the number
 * of CH_MSG results, aborts on a property violation. */
static int feed(luamp_chan *c, int peer, const uint8_t *data, size_t size, size_t received_before,
                int may_auth) {
  size_t off = 0, received = received_before;
  int msgs = 0, done = 0;
  while (!done) {
    if (off < size) {
      size_t n = size - off < 1024 ? size - off : 1024;
      ssize_t w = send(peer, data + off, n, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (w > 0) {
        off += (size_t)w;
        received += (size_t)w;
      }
      if (off == size) shutdown(peer, SHUT_WR);
    }
    for (;;) {
      const uint8_t *msg;
      size_t len;
      int r = luamp_chan_step(c, &msg, &len);
      if (c->in_cap > 2 * received + 16384) {
        fprintf(stderr, "receive buffer %zu for %zu bytes received\n", c->in_cap, received);
        abort();
      }
      if (r == CH_DONE_AUTH && !may_auth) {
        fprintf(stderr, "authenticated without the key\n");
        abort();
      }
      if (r == CH_MSG) msgs++;
      if (r == CH_AGAIN) break;
      if (r < 0) {
        done = 1;
        break;
      }
    }
    drain(peer);
    if (off == size && !done) {
      /* everything sent and the channel waits for more: it will see EOF next */
      const uint8_t *msg;
      size_t len;
      int r = luamp_chan_step(c, &msg, &len);
      if (r == CH_MSG) msgs++;
      if (r == CH_AGAIN) break;
    }
  }
  return msgs;
}

static void pair(int sv[2]) {
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0) abort();
}

/* Runs a genuine handshake between a client and a server channel over sv. */
static void handshake(luamp_chan *cl, luamp_chan *sv) {
  luamp_chan_start(sv, key, sizeof key - 1);
  luamp_chan_start(cl, key, sizeof key - 1);
  int done_c = 0, done_s = 0;
  for (int round = 0; round < 20 && !(done_c && done_s); round++) {
    const uint8_t *m;
    size_t l;
    luamp_chan_flush(sv);
    if (!done_c && luamp_chan_step(cl, &m, &l) == CH_DONE_AUTH) done_c = 1;
    luamp_chan_flush(cl);
    if (!done_s && luamp_chan_step(sv, &m, &l) == CH_DONE_AUTH) done_s = 1;
  }
  luamp_chan_flush(sv);
  if (!done_c || !done_s) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int ready;
  if (!ready) {
    if (sodium_init() < 0) abort();
    ready = 1;
  }
  if (size < 1) return 0;
  int mode = data[0] % 3;
  uint8_t suites = (uint8_t)((data[0] / 3) % 3 + 1);
  if (!crypto_aead_aes256gcm_is_available()) suites = LUAMP_SUITE_CHACHA;
  data++;
  size--;
  int sv[2];
  pair(sv);
  luamp_chan c;
  if (mode == 0) {
    luamp_chan_init(&c, sv[0], CH_SERVER);
    c.suites = suites;
    luamp_chan_start(&c, key, sizeof key - 1);
    luamp_chan_flush(&c);
    if (feed(&c, sv[1], data, size, 0, 0) != 0) abort();
  } else if (mode == 1) {
    luamp_chan_init(&c, sv[0], CH_CLIENT);
    c.suites = suites;
    luamp_chan_start(&c, key, sizeof key - 1);
    if (feed(&c, sv[1], data, size, 0, 0) != 0) abort();
  } else {
    int cv[2];
    pair(cv);              /* cv carries the genuine client; its bytes are replayed by hand */
    luamp_chan cl, srv;
    luamp_chan_init(&srv, cv[0], CH_SERVER);
    luamp_chan_init(&cl, cv[1], CH_CLIENT);
    srv.suites = cl.suites = suites;
    handshake(&cl, &srv);
    /* a genuine frame, captured instead of sent */
    if (luamp_chan_seal(&cl, "hello", 5) != 0) abort();
    size_t flen = cl.out.len - cl.out_off;
    uint8_t *frame = malloc(flen + size);
    memcpy(frame, cl.out.data + cl.out_off, flen);
    memcpy(frame + flen, data, size);
    /* the server's state moves to a fresh socket whose other end the fuzzer holds */
    luamp_close_fd(srv.fd);
    srv.fd = sv[0];
    size_t received = srv.in_end - srv.in_start;
    int msgs = feed(&srv, sv[1], frame, flen + size, received, 0);
    /* the genuine frame opens; the rest (even an exact replay of it) never does */
    if (msgs != 1) {
      fprintf(stderr, "%d frames opened, expected exactly 1\n", msgs);
      abort();
    }
    free(frame);
    luamp_chan_free(&cl);
    luamp_chan_free(&srv);
    luamp_close_fd(sv[1]);
    return 0;
  }
  luamp_chan_free(&c);
  luamp_close_fd(sv[1]);
  return 0;
}
