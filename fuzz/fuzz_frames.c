/*
 * fuzz_frames.c — libFuzzer target for the Connection frame parser (the receive path of
 * connection.c).
 *
 * The input is cut into SEQPACKET records (each: a 2-byte little-endian length, then that
 * many bytes, cut short at the end of the input), which go straight onto one end of a
 * luamp.Pipe(); that end is then closed and the other end receives with recv_bytes() or
 * recv_bytes(maxlength) until EOF. Every receive must give a string or a luamp error;
 * any crash, sanitizer report or hang is a bug. Lengths in frame headers are peer
 * claims: the receiver's peak resident size is checked now and then, and growing by more
 * than PEAK_LIMIT over the run aborts (a receiver that allocates what a header claims).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <lualib.h>

#include "internal.h"

#define PEAK_LIMIT (256L << 20)

static lua_State *L;
static long base_peak;

static const char setup_lua[] =
  "local luamp = require 'luamp'\n"
  "function fuzz_pipe() local a, b = luamp.Pipe() return a, b, a:fileno() end\n"
  "function fuzz_drain(b, maxlength)\n"
  "  for _ = 1, 64 do\n"
  "    local ok, e = pcall(b.recv_bytes, b, maxlength)\n"
  "    if ok then assert(type(e) == 'string' and (not maxlength or #e <= maxlength))\n"
  "    elseif type(e) ~= 'table' or not e.kind then error('not a luamp error: ' .. tostring(e))\n"
  "    elseif e.kind == 'EOF' then break end\n"
  "  end\n"
  "  b:close()\n"
  "end\n";

static long peak_rss(void) {
  FILE *f = fopen("/proc/self/status", "re");
  if (!f) return 0;
  char line[256];
  long kb = 0;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "VmHWM: %ld kB", &kb) == 1) break;
  fclose(f);
  return kb * 1024;
}

static void setup(void) {
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  if (luaL_dostring(L, setup_lua) != LUA_OK) {
    fprintf(stderr, "fuzz setup: %s\n", lua_tostring(L, -1));
    abort();
  }
  base_peak = peak_rss();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!L) setup();
  int base = lua_gettop(L);
  lua_getglobal(L, "fuzz_pipe");
  if (lua_pcall(L, 0, 3, 0) != LUA_OK) abort();
  int fd = (int)lua_tointeger(L, -1);
  lua_pop(L, 1);                       /* a, b */
  /* the first byte picks the receive: 0 = recv_bytes(), else recv_bytes(some maxlength) */
  lua_Integer maxlength = -1;
  if (size > 0) {
    if (data[0] & 1) maxlength = data[0] * 37;
    data++, size--;
  }
  while (size > 0) {
    size_t n = size >= 2 ? (size_t)(data[0] | data[1] << 8) : 0;
    data += size >= 2 ? 2 : size;
    size -= size >= 2 ? 2 : size;
    if (n > size) n = size;
    if (send(fd, data, n, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) break;   /* full: enough */
    data += n;
    size -= n;
  }
  /* close the sending end: the receiver must end in EOF, not wait */
  lua_getfield(L, -2, "close");
  lua_pushvalue(L, -3);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) abort();
  lua_getglobal(L, "fuzz_drain");
  lua_pushvalue(L, -2);
  if (maxlength >= 0) lua_pushinteger(L, maxlength);
  else lua_pushnil(L);
  if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
    fprintf(stderr, "fuzz_frames: %s\n", lua_tostring(L, -1));
    abort();
  }
  lua_settop(L, base);
  static unsigned runs;
  if (++runs % 256 == 0) {
    lua_gc(L, LUA_GCCOLLECT);
    long grew = peak_rss() - base_peak;
    if (grew > PEAK_LIMIT) {
      fprintf(stderr, "fuzz_frames: peak resident size grew by %ld MiB\n", grew >> 20);
      abort();
    }
  }
  return 0;
}
