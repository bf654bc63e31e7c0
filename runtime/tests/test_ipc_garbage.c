/* test_ipc_garbage.c — Connections and Queues read bytes that another process wrote, so
 * they must survive garbage: records that are not frames, lengths that lie, random bytes
 * in a queue's shared memory. Each case must end in a luamp error (or a valid value),
 * never a crash or a hang. The garbage is injected from C (rawsend, scribble) and the
 * checks run in Lua. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <lualib.h>

#include "internal.h"

/* rawsend(fd, bytes): one SEQPACKET record, bypassing the framing */
static int l_rawsend(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  lua_pushboolean(L, send((int)luaL_checkinteger(L, 1), s, n, MSG_NOSIGNAL) == (ssize_t)n);
  return 1;
}

/* scribble(memfd, offset, length, seed): overwrites part of a queue's memory with
 * pseudo-random bytes */
static int l_scribble(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  off_t off = (off_t)luaL_checkinteger(L, 2);
  size_t len = (size_t)luaL_checkinteger(L, 3);
  unsigned seed = (unsigned)luaL_checkinteger(L, 4);
  unsigned char *p = mmap(NULL, (size_t)off + len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return luaL_error(L, "mmap failed");
  for (size_t i = 0; i < len; i++) p[off + i] = (unsigned char)(rand_r(&seed) >> 7);
  munmap(p, (size_t)off + len);
  return 0;
}

static const char *const script =
  "local luamp = require 'luamp'\n"
  "local function kind(f, ...) local ok, e = pcall(f, ...) return ok and 'ok' or e.kind end\n"
  "local function le64(n) return string.pack('<I8', n) end\n"
  /* a record shorter than a length: Value, and the receiving side stays broken */
  "local a, b = luamp.Pipe()\n"
  "assert(rawsend(a:fileno(), 'abc'))\n"
  "assert(kind(b.recv_bytes, b) == 'Value')\n"
  "assert(kind(b.recv, b) == 'Value')\n"
  /* a length beyond any message */
  "a, b = luamp.Pipe()\n"
  "assert(rawsend(a:fileno(), le64(1 << 50) .. 'xx'))\n"
  "assert(kind(b.recv_bytes, b) == 'Value')\n"
  /* a first record longer than its length says */
  "a, b = luamp.Pipe()\n"
  "assert(rawsend(a:fileno(), le64(2) .. 'abcdef'))\n"
  "assert(kind(b.recv_bytes, b) == 'Value')\n"
  /* a continuation record longer than what is left of the message */
  "a, b = luamp.Pipe()\n"
  "assert(rawsend(a:fileno(), le64(100) .. string.rep('x', 20)))\n"
  "assert(rawsend(a:fileno(), string.rep('y', 200)))\n"
  "assert(kind(b.recv_bytes, b) == 'Value')\n"
  /* a well-framed message that is not codec data: Serialize from recv, bytes otherwise */
  "a, b = luamp.Pipe()\n"
  "a:send_bytes('\\255\\254 not a value')\n"
  "assert(kind(b.recv, b) == 'Serialize')\n"
  "a:send_bytes('\\255\\254 not a value')\n"
  "assert(b:recv_bytes() == '\\255\\254 not a value')\n"
  /* random records: every receive ends in a value, a string or a luamp error */
  "math.randomseed(7)\n"
  "for round = 1, 200 do\n"
  "  a, b = luamp.Pipe()\n"
  "  for _ = 1, 3 do\n"
  "    local t = {}\n"
  "    for i = 1, math.random(0, 40) do t[i] = string.char(math.random(0, 255)) end\n"
  "    local s = table.concat(t)\n"
  "    if math.random() < 0.5 then s = le64(math.random(0, 60)) .. s end\n"
  "    rawsend(a:fileno(), s)\n"
  "  end\n"
  "  a:close()\n"
  "  for _ = 1, 5 do\n"
  "    local ok, e = pcall(round % 2 == 0 and b.recv or b.recv_bytes, b)\n"
  "    assert(ok or (type(e) == 'table' and e.kind), tostring(e))\n"
  "  end\n"
  "  b:close()\n"
  "end\n"
  /* a queue whose chunks were overwritten: luamp errors, then Closed after close */
  "for seed = 1, 100 do\n"
  "  local q = luamp.Queue()\n"
  "  for i = 1, 20 do q:put(i); q:put(string.rep('z', 40000 + i)) end\n"
  "  local _, h = getmetatable(q).__luamp_handle(q)\n"
  "  scribble(h.fd, 8192 + (seed % 4) * 64, 256 + seed * 97, seed)\n"
  "  for _ = 1, 45 do\n"
  "    local ok, e = pcall(q.get, q, false)\n"
  "    assert(ok or (type(e) == 'table' and e.kind), tostring(e))\n"
  "  end\n"
  "  q:close()\n"
  "end\n"
  "return 'done'\n";

int main(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  lua_register(L, "rawsend", l_rawsend);
  lua_register(L, "scribble", l_scribble);
  int failures = 0;
  if (luaL_dostring(L, script) != LUA_OK) {
    fprintf(stderr, "test_ipc_garbage: %s\n", luaL_tolstring(L, -1, NULL));
    failures++;
  }
  lua_close(L);
  if (failures) return 1;
  printf("test_ipc_garbage: ok\n");
  return 0;
}
