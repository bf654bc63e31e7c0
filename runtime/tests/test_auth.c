/* test_auth.c — the manager's authenticated channels (auth.c): the mutual handshake with
 * the right key, Auth on both sides with a wrong one, sealed frames that open once and
 * only in order (a replayed, reordered or altered frame is refused), and a length prefix
 * that claims gigabytes before authentication, refused without allocating it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <sodium.h>

#include "auth.h"

#include "test_util.h"

static void pair(luamp_chan *cl, luamp_chan *sv) {
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) != 0) abort();
  luamp_chan_init(cl, fds[0], CH_CLIENT);
  luamp_chan_init(sv, fds[1], CH_SERVER);
}

/* Drives both sides; returns the server's and client's final step results. */
static void run_handshake(luamp_chan *cl, luamp_chan *sv, const char *kc, const char *ks,
                          int *rc, int *rs) {
  luamp_chan_start(sv, ks, strlen(ks));
  luamp_chan_start(cl, kc, strlen(kc));
  *rc = *rs = CH_AGAIN;
  for (int i = 0; i < 10; i++) {
    const uint8_t *m;
    size_t l;
    luamp_chan_flush(sv);
    if (*rc == CH_AGAIN) *rc = luamp_chan_step(cl, &m, &l);
    luamp_chan_flush(cl);
    if (*rs == CH_AGAIN) *rs = luamp_chan_step(sv, &m, &l);
  }
  luamp_chan_flush(sv);
  if (*rc == CH_AGAIN) {
    const uint8_t *m;
    size_t l;
    *rc = luamp_chan_step(cl, &m, &l);
  }
}

static void test_right_key(void) {
  luamp_chan cl, sv;
  pair(&cl, &sv);
  int rc, rs;
  run_handshake(&cl, &sv, "secret", "secret", &rc, &rs);
  CHECK(rc == CH_DONE_AUTH && rs == CH_DONE_AUTH, "handshake: client %d server %d", rc, rs);
  CHECK(luamp_chan_seal(&cl, "ping", 4) == 0, "seal");
  luamp_chan_flush(&cl);
  const uint8_t *m;
  size_t l;
  int r = luamp_chan_step(&sv, &m, &l);
  CHECK(r == CH_MSG && l == 4 && memcmp(m, "ping", 4) == 0, "server got %d", r);
  CHECK(luamp_chan_seal(&sv, "pong!", 5) == 0, "seal");
  luamp_chan_flush(&sv);
  r = luamp_chan_step(&cl, &m, &l);
  CHECK(r == CH_MSG && l == 5 && memcmp(m, "pong!", 5) == 0, "client got %d", r);
  luamp_chan_free(&cl);
  luamp_chan_free(&sv);
}

static void test_wrong_key(void) {
  luamp_chan cl, sv;
  pair(&cl, &sv);
  int rc, rs;
  run_handshake(&cl, &sv, "wrong", "secret", &rc, &rs);
  CHECK(rs == CH_EAUTH, "server should refuse a wrong key, got %d", rs);
  CHECK(rc == CH_EAUTH, "client should learn it was refused, got %d", rc);
  luamp_chan_free(&cl);
  luamp_chan_free(&sv);
}

/* The client holds the key but the "server" does not: the client refuses it. */
static void test_impostor_server(void) {
  luamp_chan cl, sv;
  pair(&cl, &sv);
  int rc, rs;
  /* the impostor cannot pass the client's proof check, so it never sends its own: the
   * client sees a refusal, and is never authenticated */
  run_handshake(&cl, &sv, "secret", "guess", &rc, &rs);
  CHECK(rc != CH_DONE_AUTH, "client authenticated an impostor");
  luamp_chan_free(&cl);
  luamp_chan_free(&sv);
}

/* Replays, reorders and bit flips of sealed frames fail with CH_EAUTH. */
static void test_tampering(int how) {
  luamp_chan cl, sv;
  pair(&cl, &sv);
  int rc, rs;
  run_handshake(&cl, &sv, "k", "k", &rc, &rs);
  CHECK(rc == CH_DONE_AUTH && rs == CH_DONE_AUTH, "handshake");
  luamp_chan_seal(&cl, "first", 5);
  size_t a_len = cl.out.len;
  luamp_chan_seal(&cl, "second", 6);
  size_t all = cl.out.len;
  uint8_t buf[256];
  memcpy(buf, cl.out.data, all);
  cl.out.len = cl.out_off = 0;
  uint8_t wire[512];
  size_t n = 0;
  if (how == 0) {          /* replay: first, first */
    memcpy(wire, buf, a_len); memcpy(wire + a_len, buf, a_len); n = 2 * a_len;
  } else if (how == 1) {   /* reorder: second, first */
    memcpy(wire, buf + a_len, all - a_len); memcpy(wire + all - a_len, buf, a_len); n = all;
  } else {                 /* one bit flipped in the first */
    memcpy(wire, buf, all); wire[6] ^= 1; n = all;
  }
  CHECK(write(cl.fd, wire, n) == (ssize_t)n, "write");
  const uint8_t *m;
  size_t l;
  int r1 = luamp_chan_step(&sv, &m, &l), r2 = r1 == CH_MSG ? luamp_chan_step(&sv, &m, &l) : r1;
  if (how == 0) CHECK(r1 == CH_MSG && r2 == CH_EAUTH, "replay: %d then %d", r1, r2);
  else CHECK(r1 == CH_EAUTH, "tampering %d opened: %d", how, r1);
  luamp_chan_free(&cl);
  luamp_chan_free(&sv);
}

static void test_huge_prefix_preauth(void) {
  luamp_chan cl, sv;
  pair(&cl, &sv);
  luamp_chan_start(&sv, "k", 1);
  luamp_chan_flush(&sv);
  const uint8_t claim[] = {0xff, 0xff, 0xff, 0xff, 'x'};
  CHECK(write(cl.fd, claim, sizeof claim) == sizeof claim, "write");
  const uint8_t *m;
  size_t l;
  int r = luamp_chan_step(&sv, &m, &l);
  CHECK(r == CH_EPROTO, "4 GiB prefix before authentication: %d", r);
  CHECK(sv.in_cap <= 16384, "allocated %zu bytes for a claim", sv.in_cap);
  /* 64 KiB + 1 is over the pre-authentication bound too */
  luamp_chan_free(&cl);
  luamp_chan_free(&sv);
  pair(&cl, &sv);
  luamp_chan_start(&sv, "k", 1);
  const uint8_t claim2[] = {0x00, 0x01, 0x00, 0x01};
  CHECK(write(cl.fd, claim2, sizeof claim2) == sizeof claim2, "write");
  r = luamp_chan_step(&sv, &m, &l);
  CHECK(r == CH_EPROTO, "64 KiB + 1 before authentication: %d", r);
  luamp_chan_free(&cl);
  luamp_chan_free(&sv);
}

/* After authentication a frame of 1 MiB arrives in pieces; the buffer grows with it. */
static void test_big_frame_grows(void) {
  luamp_chan cl, sv;
  pair(&cl, &sv);
  int rc, rs;
  run_handshake(&cl, &sv, "k", "k", &rc, &rs);
  size_t big = 1 << 20;
  char *payload = malloc(big);
  memset(payload, 'z', big);
  CHECK(luamp_chan_seal(&cl, payload, big) == 0, "seal big");
  int got = 0;
  for (int i = 0; i < 100000 && !got; i++) {
    luamp_chan_flush(&cl);
    const uint8_t *m;
    size_t l;
    int r = luamp_chan_step(&sv, &m, &l);
    if (r == CH_MSG) {
      got = 1;
      CHECK(l == big && memcmp(m, payload, big) == 0, "big frame content");
    } else {
      CHECK(r == CH_AGAIN, "big frame step %d", r);
      if (r != CH_AGAIN) break;
    }
  }
  CHECK(got, "big frame never arrived");
  free(payload);
  luamp_chan_free(&cl);
  luamp_chan_free(&sv);
}

int main(void) {
  if (sodium_init() < 0) return 1;
  test_right_key();
  test_wrong_key();
  test_impostor_server();
  for (int how = 0; how < 3; how++) test_tampering(how);
  test_huge_prefix_preauth();
  test_big_frame_grows();
  if (failures) {
    fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  puts("test_auth: ok");
  return 0;
}
