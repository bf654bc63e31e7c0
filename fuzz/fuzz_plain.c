/*
 * fuzz_plain.c — libFuzzer target for the manager's plain-value vectors (auth.c: a
 * request or reply made only of nils, booleans, numbers and strings goes as VEC_TAG, a
 * count, then a tag byte and the bytes of each value).
 *
 * The vector is read from the network: its sender has the authkey, but its bytes are
 * still checked (count, tags, lengths against the frame's end). The fuzzer plays the
 * peer of a real Lua channel (_core.auth_listen / auth_connect / accept, so the bytes go
 * through the sealed frames and the binding exactly as a manager's do):
 *   byte 0 even: the peer is a client and the Lua side a server, which steps (chan:step)
 *                and gets a request table {id, method, nargs, args...} or Serialize;
 *                or, with bit 1 set, receives as the manager's loop does (chan:receive:
 *                "req", id, method, args...) and answers through chan:reply;
 *   byte 0 odd:  the peer is a manager and the Lua side a client whose chan:request(1,
 *                "m") gets the vector as its reply: true, results... or Serialize.
 * The payload sent is VEC_TAG followed by the rest of the input. Properties checked
 * besides memory safety: a step or request either decodes or raises Serialize (nothing
 * else); whatever decodes is sent back through chan:send_reply and must come out byte
 * for byte as the payload (the encoding is canonical: one encoding per list of values,
 * so a value changed, dropped or invented on the way shows); the client's own request
 * is the exact vector of (1, "m"); and after any input, accepted or refused, the
 * channel still carries a genuine vector correctly (a refused frame is consumed whole).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <lualib.h>

#include "auth.h"

#define VEC_TAG 0xa5        /* as auth.c */

static const char key[] = "fuzz key";
static lua_State *L;
static char dir[64], path[96];
static int listen_fd;

static const char helpers_lua[] =
  "local core = require 'luamp._core'\n"
  "local key, path = ...\n"
  "local F, listener, ch = {}, nil, nil\n"
  "function F.listen() listener = core.auth_listen(path); return listener:fileno() end\n"
  "function F.accept() ch = assert(listener:accept(), 'no connection'); ch:start(key) end\n"
  "function F.connect() ch = core.auth_connect(path); ch:start(key) end\n"
  "function F.step() return ch:step() end\n"
  "function F.close() ch:close(); ch = nil end\n"
  "local function serialize(ok, e)\n"
  "  assert(not ok and core.is_error(e, 'Serialize'), 'not a Serialize error: ' .. tostring(e))\n"
  "end\n"
  /* the server's side: the fuzzed request, echoed as a reply of all its values */
  "function F.serve()\n"
  "  local ok, what, req = pcall(ch.step, ch)\n"
  "  if not ok then serialize(ok, what); return false end\n"
  "  assert(what == 'msg' and type(req) == 'table', 'no request: ' .. tostring(what))\n"
  "  local n = req[3]\n"
  "  assert(math.type(n) == 'integer' and n >= 0 and n <= 248, 'bad nargs')\n"
  "  ch:send_reply({true, n + 2, req[1], req[2], table.unpack(req, 4, n + 3)})\n"
  "  return true\n"
  "end\n"
  /* the same through the manager loop's receive and reply */
  "function F.receive_serve()\n"
  "  local r = table.pack(pcall(ch.receive, ch))\n"
  "  if not r[1] then serialize(r[1], r[2]); return false end\n"
  "  assert(r[2] == 'req' and r.n >= 4, 'no request: ' .. tostring(r[2]))\n"
  "  ch:reply(table.unpack(r, 3, r.n))\n"
  "  return true\n"
  "end\n"
  "function F.receive_genuine()\n"
  "  local r = table.pack(ch:receive())\n"
  "  assert(r.n == 5 and r[1] == 'req' and r[2] == 7 and math.type(r[2]) == 'integer' and\n"
  "         r[3] == 'get' and r[4] == 'k' and r[5] == -0.5,\n"
  "         'the genuine request after the fuzzed one came out wrong')\n"
  "end\n"
  "function F.serve_genuine()\n"
  "  local what, req = ch:step()\n"
  "  assert(what == 'msg' and req[1] == 7 and math.type(req[1]) == 'integer' and\n"
  "         req[2] == 'get' and req[3] == 2 and req[4] == 'k' and req[5] == -0.5,\n"
  "         'the genuine request after the fuzzed one came out wrong')\n"
  "end\n"
  /* the client's side: the fuzzed reply, its results sent back as a reply */
  "function F.ask()\n"
  "  local r = table.pack(pcall(ch.request, ch, 1, 'm'))\n"
  "  if not r[1] then serialize(r[1], r[2]); return false end\n"
  "  assert(r[2] == true, 'a reply vector must give true first')\n"
  "  ch:send_reply({true, r.n - 2, table.unpack(r, 3, r.n)})\n"
  "  return true\n"
  "end\n"
  "function F.ask_genuine()\n"
  "  local r = table.pack(ch:request(2, 'n'))\n"
  "  assert(r.n == 3 and r[1] == true and r[2] == 'ok' and r[3] == false,\n"
  "         'the genuine reply after the fuzzed one came out wrong')\n"
  "end\n"
  "return F\n";

static void cleanup(void) {
  unlink(path);
  rmdir(dir);
}

/* Calls helper `name` with no arguments; returns its boolean result. */
static int call(const char *name) {
  lua_getfield(L, 1, name);
  if (lua_pcall(L, 0, 1, 0) != LUA_OK) {
    fprintf(stderr, "fuzz_plain: %s: %s\n", name, luaL_tolstring(L, -1, NULL));
    abort();
  }
  int r = lua_toboolean(L, -1);
  lua_settop(L, 1);
  return r;
}

static void setup(void) {
  strcpy(dir, "/tmp/fuzz_plain.XXXXXX");
  if (!mkdtemp(dir)) abort();
  snprintf(path, sizeof path, "%s/s", dir);
  atexit(cleanup);
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  if (luaL_loadstring(L, helpers_lua) != LUA_OK) abort();
  lua_pushstring(L, key);
  lua_pushstring(L, path);
  if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
    fprintf(stderr, "fuzz_plain setup: %s\n", lua_tostring(L, -1));
    abort();
  }
  /* stack: [1] the helpers, for good */
  lua_getfield(L, 1, "listen");
  if (lua_pcall(L, 0, 1, 0) != LUA_OK) abort();
  listen_fd = (int)lua_tointeger(L, -1);
  lua_settop(L, 1);
}

static void append_u64(uint8_t **p, uint64_t v) {
  for (int i = 0; i < 8; i++) *(*p)++ = (uint8_t)(v >> (8 * i));
}

static size_t vec_str(uint8_t *p, const char *s) {
  uint8_t *q = p;
  *q++ = 's';
  append_u64(&q, strlen(s));
  memcpy(q, s, strlen(s));
  return (size_t)(q - p) + strlen(s);
}

/* Steps the peer until a message comes; aborts on anything else. */
static void peer_message(luamp_chan *c, const uint8_t **msg, size_t *len) {
  for (int tries = 0; tries < 1000; tries++) {
    int r = luamp_chan_step(c, msg, len);
    if (r == CH_MSG) return;
    if (r != CH_AGAIN) {
      fprintf(stderr, "fuzz_plain: peer step %d (%s)\n", r, c->why ? c->why : "");
      abort();
    }
    usleep(100);
  }
  fprintf(stderr, "fuzz_plain: no message from the Lua side\n");
  abort();
}

static void expect(const uint8_t *got, size_t glen, const uint8_t *want, size_t wlen,
                   const char *what) {
  if (glen != wlen || memcmp(got, want, wlen) != 0) {
    fprintf(stderr, "fuzz_plain: %s differs: %zu bytes, expected these %zu\n", what, glen, wlen);
    abort();
  }
}

static void peer_send(luamp_chan *c, const uint8_t *payload, size_t len) {
  if (luamp_chan_seal(c, payload, len) != 0 || luamp_chan_flush(c) != 1) abort();
}

/* The Lua side is the server; the fuzzer a client. */
static void as_client(const uint8_t *payload, size_t len, int receive) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  strcpy(sa.sun_path, path);
  if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) abort();
  luamp_chan c;
  luamp_chan_init(&c, fd, CH_CLIENT);
  luamp_chan_start(&c, key, sizeof key - 1);
  call("accept");                          /* queues and sends the server's hello */
  const uint8_t *msg;
  size_t mlen;
  if (luamp_chan_step(&c, &msg, &mlen) != CH_AGAIN) abort();   /* hello in, proof out */
  lua_getfield(L, 1, "step");
  if (lua_pcall(L, 0, 1, 0) != LUA_OK || strcmp(lua_tostring(L, -1), "auth") != 0) abort();
  lua_settop(L, 1);
  if (luamp_chan_step(&c, &msg, &mlen) != CH_DONE_AUTH) abort();

  peer_send(&c, payload, len);
  if (call(receive ? "receive_serve" : "serve")) {
    peer_message(&c, &msg, &mlen);
    expect(msg, mlen, payload, len, "the decoded request re-encoded");
  }
  /* a genuine request after it: (7, "get", "k", -0.5) */
  uint8_t genuine[64], *p = genuine;
  *p++ = VEC_TAG;
  *p++ = 4;
  *p++ = 'i';
  append_u64(&p, 7);
  p += vec_str(p, "get");
  p += vec_str(p, "k");
  double half = -0.5;
  uint64_t bits;
  memcpy(&bits, &half, 8);
  *p++ = 'd';
  append_u64(&p, bits);
  peer_send(&c, genuine, (size_t)(p - genuine));
  call(receive ? "receive_genuine" : "serve_genuine");
  call("close");
  luamp_chan_free(&c);
}

/* The Lua side is a client; the fuzzer its manager. */
static void as_manager(const uint8_t *payload, size_t len) {
  call("connect");
  int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (fd < 0) abort();
  luamp_chan s;
  luamp_chan_init(&s, fd, CH_SERVER);
  luamp_chan_start(&s, key, sizeof key - 1);
  if (luamp_chan_flush(&s) != 1) abort();
  const uint8_t *msg;
  size_t mlen;
  lua_getfield(L, 1, "step");                /* hello in, proof out */
  if (lua_pcall(L, 0, 1, 0) != LUA_OK || !lua_isnil(L, -1)) abort();
  lua_settop(L, 1);
  if (luamp_chan_step(&s, &msg, &mlen) != CH_DONE_AUTH || luamp_chan_flush(&s) != 1) abort();
  lua_getfield(L, 1, "step");
  if (lua_pcall(L, 0, 1, 0) != LUA_OK || strcmp(lua_tostring(L, -1), "auth") != 0) abort();
  lua_settop(L, 1);

  /* the reply goes first: the client's request then finds it without waiting */
  peer_send(&s, payload, len);
  int echoed = call("ask");
  uint8_t req[64], *p = req;
  *p++ = VEC_TAG;
  *p++ = 2;
  *p++ = 'i';
  append_u64(&p, 1);
  p += vec_str(p, "m");
  peer_message(&s, &msg, &mlen);
  expect(msg, mlen, req, (size_t)(p - req), "the client's request (1, \"m\")");
  if (echoed) {
    peer_message(&s, &msg, &mlen);
    expect(msg, mlen, payload, len, "the decoded reply re-encoded");
  }
  /* a genuine reply after it: ("ok", false) */
  uint8_t genuine[64];
  p = genuine;
  *p++ = VEC_TAG;
  *p++ = 2;
  p += vec_str(p, "ok");
  *p++ = 'f';
  peer_send(&s, genuine, (size_t)(p - genuine));
  call("ask_genuine");
  peer_message(&s, &msg, &mlen);             /* its request (2, "n") */
  call("close");
  luamp_chan_free(&s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static unsigned runs;
  if (!L) setup();
  if (size < 1) return 0;
  uint8_t *payload = malloc(size);
  payload[0] = VEC_TAG;
  memcpy(payload + 1, data + 1, size - 1);
  if (data[0] & 1) as_manager(payload, size);
  else as_client(payload, size, data[0] & 2);
  free(payload);
  if (++runs % 256 == 0) lua_gc(L, LUA_GCCOLLECT);
  return 0;
}
