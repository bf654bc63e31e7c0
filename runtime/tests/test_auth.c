/* test_auth.c — the manager's authenticated channels (auth.c): the mutual handshake with
 * the right key, Auth on both sides with a wrong one, sealed frames that open once and
 * only in order (a replayed, reordered or altered frame is refused), and a length prefix
 * that claims gigabytes before authentication, refused without allocating it. Frames are
 * checked under each session cipher (AES-256-GCM where the CPU runs it, ChaCha20-Poly1305),
 * with the choice negotiated (the best both sides run), bound into the proofs (an edited
 * offer fails both) and held to the offer (a proven client cannot pick another). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <sodium.h>

#include "auth.h"

#include "test_util.h"

/* the ciphers the next pair's client and server run (0: what luamp_chan_init found) */
static uint8_t suites_cl, suites_sv;

static void pair(luamp_chan *cl, luamp_chan *sv) {
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) != 0) abort();
  luamp_chan_init(cl, fds[0], CH_CLIENT);
  luamp_chan_init(sv, fds[1], CH_SERVER);
  if (suites_cl) cl->suites = suites_cl;
  if (suites_sv) sv->suites = suites_sv;
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

/* Frames of every length from 0 to 300 bytes open on the other side, in place. */
static void test_lengths(void) {
  luamp_chan cl, sv;
  pair(&cl, &sv);
  int rc, rs;
  run_handshake(&cl, &sv, "k", "k", &rc, &rs);
  CHECK(rc == CH_DONE_AUTH && rs == CH_DONE_AUTH, "handshake");
  uint8_t payload[300];
  for (size_t i = 0; i < sizeof payload; i++) payload[i] = (uint8_t)(i * 7 + 1);
  for (size_t n = 0; n <= sizeof payload; n++) {
    luamp_chan *from = n % 2 ? &cl : &sv, *to = n % 2 ? &sv : &cl;
    CHECK(luamp_chan_seal(from, payload, n) == 0, "seal %zu", n);
    CHECK(from->out.len == 4 + n + 16, "frame of %zu bytes is %zu on the wire", n, from->out.len);
    /* (8 bytes: a shorter ciphertext may match its plaintext by chance) */
    CHECK(n < 8 || memcmp(from->out.data + 4, payload, 8) != 0, "%zu bytes sealed in clear", n);
    luamp_chan_flush(from);
    const uint8_t *m;
    size_t l;
    int r = luamp_chan_step(to, &m, &l);
    CHECK(r == CH_MSG && l == n && memcmp(m, payload, n) == 0, "frame of %zu bytes: %d", n, r);
  }
  luamp_chan_free(&cl);
  luamp_chan_free(&sv);
}

/* Both sides end on the best cipher they both run. */
static void test_negotiation(uint8_t want) {
  luamp_chan cl, sv;
  pair(&cl, &sv);
  int rc, rs;
  run_handshake(&cl, &sv, "k", "k", &rc, &rs);
  CHECK(rc == CH_DONE_AUTH && rs == CH_DONE_AUTH, "handshake (client %d, server %d)", cl.suites, sv.suites);
  CHECK(cl.suite == want && sv.suite == want, "client %d and server %d chose %d and %d, expected %d",
        cl.suites, sv.suites, cl.suite, sv.suite, want);
  luamp_chan_free(&cl);
  luamp_chan_free(&sv);
}

/* A client that runs nothing the server offers says so (EPROTO), unauthenticated. */
static void test_nothing_in_common(void) {
  luamp_chan cl, sv;
  pair(&cl, &sv);
  sv.suites = LUAMP_SUITE_CHACHA;
  cl.suites = LUAMP_SUITE_AESGCM;
  int rc, rs;
  run_handshake(&cl, &sv, "k", "k", &rc, &rs);
  CHECK(rc == CH_EPROTO && rs != CH_DONE_AUTH, "no common cipher: client %d server %d", rc, rs);
  luamp_chan_free(&cl);
  luamp_chan_free(&sv);
}

/* A man in the middle rewrites the server's offer (to push the client to another cipher,
 * or to one the server does not run): the proofs cover the offer, so nobody authenticates. */
static void test_offer_edited(uint8_t forged) {
  luamp_chan cl, sv;
  pair(&cl, &sv);
  luamp_chan_start(&sv, "k", 1);
  luamp_chan_start(&cl, "k", 1);
  CHECK(sv.out.len == 4 + 41, "hello is %zu bytes", sv.out.len);
  sv.out.data[4 + 40] = (char)forged;
  luamp_chan_flush(&sv);
  const uint8_t *m;
  size_t l;
  int rc = luamp_chan_step(&cl, &m, &l), rs = CH_AGAIN;
  for (int i = 0; i < 5; i++) {
    luamp_chan_flush(&cl);
    if (rs == CH_AGAIN) rs = luamp_chan_step(&sv, &m, &l);
    luamp_chan_flush(&sv);
    if (rc == CH_AGAIN) rc = luamp_chan_step(&cl, &m, &l);
  }
  CHECK(rs == CH_EAUTH, "server accepted a proof over an edited offer (%d): %d", forged, rs);
  CHECK(rc != CH_DONE_AUTH, "client authenticated after an edited offer (%d)", forged);
  luamp_chan_free(&cl);
  luamp_chan_free(&sv);
}

/* A client that holds the key but picks a cipher the server did not offer (a proof made
 * by hand over exactly that transcript) is refused: EPROTO, not authenticated. */
static void test_unoffered_choice(void) {
  luamp_chan cl, sv;
  pair(&cl, &sv);
  sv.suites = LUAMP_SUITE_CHACHA;
  luamp_chan_start(&sv, "k", 1);
  luamp_chan_flush(&sv);
  uint8_t hello[4 + 41];
  CHECK(read(cl.fd, hello, sizeof hello) == (ssize_t)sizeof hello, "read hello");
  uint8_t k[32], nc[32] = {7}, frame[4 + 65], offer = hello[4 + 40];
  crypto_generichash(k, 32, (const uint8_t *)"k", 1, NULL, 0);
  for (int choice = 0; choice < 256; choice += choice < 4 ? 1 : 61) {
    if (choice == LUAMP_SUITE_CHACHA) continue;
    luamp_chan s2;
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) != 0) abort();
    luamp_chan_init(&s2, fds[1], CH_SERVER);
    s2.suites = LUAMP_SUITE_CHACHA;
    luamp_chan_start(&s2, "k", 1);
    luamp_chan_flush(&s2);
    CHECK(read(fds[0], hello, sizeof hello) == (ssize_t)sizeof hello, "read hello");
    uint8_t c = (uint8_t)choice;
    crypto_generichash_state st;
    crypto_generichash_init(&st, k, 32, 32);
    crypto_generichash_update(&st, (const uint8_t *)"C", 1);
    crypto_generichash_update(&st, hello + 4 + 8, 32);
    crypto_generichash_update(&st, nc, 32);
    crypto_generichash_update(&st, &offer, 1);
    crypto_generichash_update(&st, &c, 1);
    frame[0] = frame[1] = frame[2] = 0;
    frame[3] = 65;
    memcpy(frame + 4, nc, 32);
    frame[4 + 32] = c;
    crypto_generichash_final(&st, frame + 4 + 33, 32);
    CHECK(write(fds[0], frame, sizeof frame) == (ssize_t)sizeof frame, "write proof");
    const uint8_t *m;
    size_t l;
    int r = luamp_chan_step(&s2, &m, &l);
    CHECK(r == CH_EPROTO && s2.state == CH_BROKEN, "choice %d of offer %d: %d", choice, offer, r);
    luamp_chan_free(&s2);
    close(fds[0]);
  }
  luamp_chan_free(&cl);
  luamp_chan_free(&sv);
}

static void all_frame_tests(void) {
  test_right_key();
  test_wrong_key();
  test_impostor_server();
  for (int how = 0; how < 3; how++) test_tampering(how);
  test_huge_prefix_preauth();
  test_big_frame_grows();
  test_lengths();
}

int main(void) {
  if (sodium_init() < 0) return 1;
  int aes = crypto_aead_aes256gcm_is_available();
  printf("test_auth: AES-256-GCM %s on this CPU\n", aes ? "runs" : "does not run");
  all_frame_tests();                                     /* the best cipher here */
  suites_cl = suites_sv = LUAMP_SUITE_CHACHA;
  all_frame_tests();
  suites_cl = suites_sv = 0;
  uint8_t all = LUAMP_SUITE_CHACHA | LUAMP_SUITE_AESGCM;
  test_negotiation(aes ? LUAMP_SUITE_AESGCM : LUAMP_SUITE_CHACHA);
  suites_sv = LUAMP_SUITE_CHACHA;
  test_negotiation(LUAMP_SUITE_CHACHA);
  suites_sv = 0;
  suites_cl = LUAMP_SUITE_CHACHA;
  test_negotiation(LUAMP_SUITE_CHACHA);
  suites_cl = 0;
  if (aes) {
    suites_cl = suites_sv = LUAMP_SUITE_AESGCM;
    all_frame_tests();
    suites_cl = suites_sv = 0;
  }
  test_nothing_in_common();
  test_offer_edited(LUAMP_SUITE_CHACHA);
  test_offer_edited(LUAMP_SUITE_AESGCM);
  test_offer_edited(all | 4);
  test_unoffered_choice();
  if (failures) {
    fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  puts("test_auth: ok");
  return 0;
}
