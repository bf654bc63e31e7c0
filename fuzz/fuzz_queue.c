/*
 * fuzz_queue.c — libFuzzer target for a Queue's reading side (queue.c's get on a shared
 * header and records that another process wrote).
 *
 * Every process holding a queue can write its memfd, so the state in the header (both
 * sides' committed states and counts, the spare slots, the allocator) and every record
 * (length, kind, token, a large item's offset and length) is a claim. Each input makes a
 * fresh queue, fills it with a few valid items, then scribbles it as a peer could:
 *   byte 0      bits 0-1: Queue, JoinableQueue or SimpleQueue (3: Queue with maxsize 20);
 *               bits 2-4: valid items put first; bit 5: put after the gets; bit 6:
 *               task_done and join(0) too; bit 7: chunk patches land in the first
 *               64 KiB of the first chunk (else its first 2 KiB)
 *   byte 1      which kinds of item are put first (integers, short and 1 KiB strings,
 *               a 40 KB string, which goes to an extent of its own, a table)
 *   then patches until the input ends, each a tag byte t:
 *     t & 1     a header patch: u16 offset (into the header's fields, 8-aligned; the two
 *               lock words are left alone: test_queue_scribble covers those), then 8
 *               bytes v: (t >> 1) & 3 = 0 store v, 1 add the signed byte v[0], 2 flip
 *               bit v[0] % 64, 3 store the low 4 bytes of v
 *     else      a chunk patch: u16 offset, u8 n, n bytes, into the first chunk
 * Then up to 64 gets (raw: the bytes of each item, _get_raw) without blocking, qsize,
 * empty and tostring, optionally a put of a small and of a 40 KB item and two gets more.
 * Every call must return or raise a luamp error of kind Empty, Full or Value ("shared
 * memory is corrupt"); an item can be no longer than the memfd. Each item's bytes are
 * also checked against the codec: luamp_decoded_string (the get's fast path for a
 * string) must say "a string, these bytes" exactly when the full decoder, untrusted,
 * decodes them to that string. Any crash, sanitizer report, hang or broken rule is a bug.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lualib.h>

#include "internal.h"

static lua_State *L;
static struct {
  lua_Integer header_size, qshm_size, chunk_size, chunk_hdr, lock_size, tlock, hlock;
} lay;

static lua_Integer field(const char *name) {
  lua_getfield(L, -1, name);
  if (!lua_isinteger(L, -1)) {
    fprintf(stderr, "fuzz_queue: _queue_layout has no %s\n", name);
    abort();
  }
  lua_Integer v = lua_tointeger(L, -1);
  lua_pop(L, 1);
  return v;
}

static void setup(void) {
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  if (luaL_dostring(L, "return require('luamp._core')._queue_layout()") != LUA_OK) {
    fprintf(stderr, "fuzz_queue setup: %s\n", lua_tostring(L, -1));
    abort();
  }
  lay.header_size = field("header_size");
  lay.qshm_size = field("qshm_size");
  lay.chunk_size = field("chunk_size");
  lay.chunk_hdr = field("chunk_hdr");
  lay.lock_size = field("lock_size");
  lay.tlock = field("tlock");
  lay.hlock = field("hlock");
  lua_pop(L, 1);
}

/* The error at the top is a luamp error of one of the kinds a garbled queue may give. */
static void expect_kind(const char *what) {
  const char *k = NULL;
  if (lua_istable(L, -1)) {
    lua_getfield(L, -1, "kind");
    k = lua_tostring(L, -1);
    lua_pop(L, 1);
  }
  if (k && (!strcmp(k, "Empty") || !strcmp(k, "Full") || !strcmp(k, "Value"))) return;
  fprintf(stderr, "fuzz_queue: %s raised %s\n", what, luaL_tolstring(L, -1, NULL));
  abort();
}

/* q:method(args...) with the queue at index qi; nargs pushed above it already. */
static int call(int qi, const char *method, int nargs, int nres) {
  lua_getfield(L, qi, method);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1 + nargs);
    return -1;
  }
  lua_insert(L, -1 - nargs);
  lua_pushvalue(L, qi);
  lua_insert(L, -1 - nargs);
  int rc = lua_pcall(L, 1 + nargs, nres, 0);
  if (rc != LUA_OK) {
    expect_kind(method);
    lua_pop(L, 1);
    return 1;
  }
  return 0;
}

/* The get's fast path for strings and the full (untrusted) decoder agree on s. */
static void check_codec(const char *s, size_t len) {
  const char *fs = NULL;
  size_t flen = 0;
  int fast = luamp_decoded_string(s, len, &fs, &flen);
  if (fast && (fs < s || flen > len || fs + flen != s + len)) abort();
  int top = lua_gettop(L);
  int ok = luamp_decodex(L, s, len, LUAMP_DECODE_UNTRUSTED) == 0;
  int is_str = ok && lua_type(L, -1) == LUA_TSTRING;
  if (fast != is_str) {
    fprintf(stderr, "fuzz_queue: fast path says %s, decoder %s\n", fast ? "string" : "no string",
            is_str ? "string" : "no string");
    abort();
  }
  if (fast && (lua_rawlen(L, -1) != flen || memcmp(lua_tostring(L, -1), fs, flen) != 0)) abort();
  lua_settop(L, top);
}

static size_t memfd_size(int fd) {
  struct stat st;
  if (fstat(fd, &st) < 0) abort();
  return (size_t)st.st_size;
}

static int memfd_of(int qi) {
  lua_getmetatable(L, qi);
  lua_getfield(L, -1, "__luamp_handle");
  lua_pushvalue(L, qi);
  if (lua_pcall(L, 1, 2, 0) != LUA_OK) abort();
  lua_getfield(L, -1, "fd");
  int fd = (int)lua_tointeger(L, -1);
  lua_pop(L, 4);
  return fd;
}

static const char *const kinds[] = {"Queue", "JoinableQueue", "SimpleQueue", "Queue"};

static void put_valid(int qi, int which, int i) {
  switch (which) {
    case 0: lua_pushinteger(L, i * 1000003); break;
    case 1: lua_pushfstring(L, "item %d", i); break;
    case 2: {
      char b[1024];
      memset(b, 'a' + i % 26, sizeof b);
      lua_pushlstring(L, b, sizeof b);
      break;
    }
    case 3: {
      static char big[40000];
      memset(big, 'A' + i % 26, sizeof big);
      lua_pushlstring(L, big, sizeof big);
      break;
    }
    default:
      lua_createtable(L, 2, 1);
      lua_pushinteger(L, i);
      lua_rawseti(L, -2, 1);
      lua_pushstring(L, "x");
      lua_setfield(L, -2, "k");
  }
  lua_pushboolean(L, 0);
  if (call(qi, "put", 2, 0) != 0) abort();   /* a fresh queue takes them all */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!L) setup();
  if (size < 2) return 0;
  int base = lua_gettop(L);
  uint8_t flags = data[0], mix = data[1];
  data += 2, size -= 2;

  lua_getglobal(L, "luamp");
  lua_getfield(L, -1, kinds[flags & 3]);
  lua_remove(L, -2);
  if ((flags & 3) == 3) lua_pushinteger(L, 20);
  if (lua_pcall(L, (flags & 3) == 3, 1, 0) != LUA_OK) abort();
  int qi = lua_gettop(L);
  int nput = (flags >> 2) & 7;
  for (int i = 0; i < nput; i++) put_valid(qi, i == 4 || i == 6 ? 4 : (mix >> (i % 4 * 2)) & 3, i);

  int fd = memfd_of(qi);
  size_t span = (size_t)(lay.header_size + lay.chunk_size);
  unsigned char *map = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) abort();
  unsigned char *chunk = map + lay.header_size;
  size_t chunk_span = flags & 0x80 ? 65536 : 2048;
  while (size > 0) {
    uint8_t t = data[0];
    if (t & 1) {
      if (size < 11) break;
      size_t off = (size_t)(data[1] | data[2] << 8) % (size_t)lay.qshm_size & ~(size_t)7;
      uint64_t v, old;
      memcpy(&v, data + 3, 8);
      data += 11, size -= 11;
      size_t lo = off, hi = off + 8;
      if ((hi > (size_t)lay.tlock && lo < (size_t)(lay.tlock + lay.lock_size)) ||
          (hi > (size_t)lay.hlock && lo < (size_t)(lay.hlock + lay.lock_size)))
        continue;
      memcpy(&old, map + off, 8);
      switch ((t >> 1) & 3) {
        case 0: break;
        case 1: v = old + (uint64_t)(int64_t)(int8_t)(v & 0xff); break;
        case 2: v = old ^ ((uint64_t)1 << (v % 64)); break;
        default: v = (old & ~(uint64_t)0xffffffff) | (v & 0xffffffff);
      }
      memcpy(map + off, &v, 8);
    } else {
      if (size < 4) break;
      size_t off = (size_t)(data[1] | data[2] << 8) % chunk_span;
      size_t n = data[3];
      data += 4, size -= 4;
      if (n > size) n = size;
      for (size_t i = 0; i < n && off + i < (size_t)lay.chunk_size; i++) chunk[off + i] = data[i];
      data += n, size -= n;
    }
  }
  munmap(map, span);

  for (int round = 0; round < 2; round++) {
    for (int n = 0; n < 64; n++) {
      lua_pushboolean(L, 0);
      if (call(qi, "_get_raw", 1, 1) != 0) break;
      size_t len;
      const char *s = lua_tolstring(L, -1, &len);
      if (!s || len > memfd_size(fd)) abort();
      check_codec(s, len);
      lua_pop(L, 1);
    }
    call(qi, "qsize", 0, 0);
    call(qi, "empty", 0, 0);
    call(qi, "full", 0, 0);
    lua_getglobal(L, "tostring");
    lua_pushvalue(L, qi);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) expect_kind("tostring"), lua_pop(L, 1);
    if (flags & 0x40) {
      call(qi, "task_done", 0, 0);
      lua_pushnumber(L, 0);
      call(qi, "join", 1, 0);
    }
    if (round == 1 || !(flags & 0x20)) break;
    lua_pushliteral(L, "x");
    lua_pushboolean(L, 0);
    call(qi, "put", 2, 0);
    char big[40000];
    memset(big, 'q', sizeof big);
    lua_pushlstring(L, big, sizeof big);
    lua_pushboolean(L, 0);
    call(qi, "put", 2, 0);
  }
  call(qi, "close", 0, 0);
  lua_settop(L, base);
  static unsigned runs;
  if (++runs % 256 == 0) lua_gc(L, LUA_GCCOLLECT);
  return 0;
}
