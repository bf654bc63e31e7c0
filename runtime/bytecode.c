/*
 * bytecode.c — reading a Lua function's own bytecode (lua_dump output, Lua 5.4 format)
 * for the one question the Pool asks of it: which global names does this function (and
 * every function nested in it) read? A worker forked before the user defined or changed
 * a global function would otherwise call a stale one, or nil; the Pool sends along the
 * global functions a task reads that changed since the fork (lua/luamp/pool.lua).
 *
 * A global read is OP_GETTABUP whose upvalue is named _ENV and whose key is a string
 * constant. The dump is made here from a function of this state, so it is trusted, but
 * every count and offset is still checked against its length: a malformed or foreign
 * format (another Lua version) gives an empty list, never a read out of bounds.
 *
 * The dump is written twice, first only counting its bytes, then into a userdata of that
 * size, so no malloc'd memory is held while Lua may raise.
 */
#include <string.h>

#include "internal.h"

#define OP_GETTABUP 11          /* lopcodes.h, Lua 5.4 */
#define MAX_PROTO_DEPTH 200

typedef struct reader {
  const unsigned char *p, *end;
  int bad;
} reader;

static size_t rd_size(reader *r) {
  size_t x = 0;
  for (int i = 0; i < 10; i++) {
    if (r->p >= r->end) { r->bad = 1; return 0; }
    unsigned char b = *r->p++;
    x = (x << 7) | (b & 0x7f);
    if (b & 0x80) return x;
  }
  r->bad = 1;
  return 0;
}

static void rd_skip(reader *r, size_t n) {
  if (r->bad || (size_t)(r->end - r->p) < n) { r->bad = 1; return; }
  r->p += n;
}

static unsigned char rd_byte(reader *r) {
  if (r->bad || r->p >= r->end) { r->bad = 1; return 0; }
  return *r->p++;
}

/* A string: its bytes in place (*s, *len); *s is NULL for the absent string. */
static void rd_string(reader *r, const char **s, size_t *len) {
  size_t n = rd_size(r);
  *s = NULL;
  *len = 0;
  if (r->bad || n == 0) return;
  n--;
  if ((size_t)(r->end - r->p) < n) { r->bad = 1; return; }
  *s = (const char *)r->p;
  *len = n;
  r->p += n;
}

/* Adds to the set at `set` (a table used as a set) and list at `list` the global names
 * read by the function whose dump starts at r. Returns 0 when the dump does not parse. */
static int read_function(lua_State *L, reader *r, int set, int list, int depth) {
  if (depth > MAX_PROTO_DEPTH) return 0;
  const char *s;
  size_t len;
  rd_string(r, &s, &len);                  /* source */
  rd_size(r); rd_size(r);                  /* linedefined, lastlinedefined */
  rd_skip(r, 3);                           /* numparams, is_vararg, maxstacksize */
  size_t ncode = rd_size(r);
  if (r->bad || ncode > (size_t)(r->end - r->p) / 4) return 0;
  const unsigned char *code = r->p;
  r->p += ncode * 4;

  size_t nk = rd_size(r);
  if (r->bad || nk > (size_t)(r->end - r->p)) return 0;
  /* where each constant string is (NULL for other constants) */
  const char **kstr = lua_newuserdatauv(L, (nk ? nk : 1) * sizeof *kstr, 0);
  size_t *klen = lua_newuserdatauv(L, (nk ? nk : 1) * sizeof *klen, 0);
  for (size_t i = 0; i < nk && !r->bad; i++) {
    kstr[i] = NULL;
    unsigned char tt = rd_byte(r);
    switch (tt) {
      case 0: case 1: case 17: break;                 /* nil, false, true */
      case 3: case 19: rd_skip(r, 8); break;          /* integer, float */
      case 4: case 20: rd_string(r, &kstr[i], &klen[i]); break;   /* strings */
      default: r->bad = 1;
    }
  }
  size_t nup = rd_size(r);
  if (r->bad || nup > 255) { lua_pop(L, 2); return 0; }
  rd_skip(r, nup * 3);
  size_t nproto = rd_size(r);
  if (r->bad || nproto > (size_t)(r->end - r->p)) { lua_pop(L, 2); return 0; }
  for (size_t i = 0; i < nproto; i++)
    if (!read_function(L, r, set, list, depth + 1)) { lua_pop(L, 2); return 0; }

  /* debug information: line info, absolute line info, locals, then upvalue names */
  size_t nline = rd_size(r);
  rd_skip(r, nline);
  size_t nabs = rd_size(r);
  for (size_t i = 0; i < nabs && !r->bad; i++) { rd_size(r); rd_size(r); }
  size_t nloc = rd_size(r);
  for (size_t i = 0; i < nloc && !r->bad; i++) { rd_string(r, &s, &len); rd_size(r); rd_size(r); }
  size_t nupname = rd_size(r);
  if (r->bad || nupname > 255) { lua_pop(L, 2); return 0; }
  int env[256];
  memset(env, 0, sizeof env);
  for (size_t i = 0; i < nupname && !r->bad; i++) {
    rd_string(r, &s, &len);
    env[i] = s && len == 4 && memcmp(s, "_ENV", 4) == 0;
  }
  if (r->bad) { lua_pop(L, 2); return 0; }

  for (size_t pc = 0; pc < ncode; pc++) {
    const unsigned char *q = code + pc * 4;
    uint32_t ins = (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24;
    if ((ins & 0x7f) != OP_GETTABUP) continue;
    unsigned b = (ins >> 16) & 0xff, c = (ins >> 24) & 0xff;
    if (!env[b] || c >= nk || !kstr[c]) continue;
    lua_pushlstring(L, kstr[c], klen[c]);
    if (lua_rawget(L, set) == LUA_TNIL) {
      lua_pushlstring(L, kstr[c], klen[c]);
      lua_pushboolean(L, 1);
      lua_rawset(L, set);
      lua_pushlstring(L, kstr[c], klen[c]);
      lua_rawseti(L, list, (lua_Integer)lua_rawlen(L, list) + 1);
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 2);
  return 1;
}

static int count_writer(lua_State *L, const void *p, size_t sz, void *ud) {
  (void)L; (void)p;
  *(size_t *)ud += sz;
  return 0;
}

typedef struct fill { unsigned char *at; size_t left; } fill;

static int fill_writer(lua_State *L, const void *p, size_t sz, void *ud) {
  (void)L;
  fill *f = ud;
  if (sz > f->left) return 1;
  memcpy(f->at, p, sz);
  f->at += sz;
  f->left -= sz;
  return 0;
}

/* global_reads(f) -> {name, ...}: the global names f and its nested functions read, in
 * the order first met; {} for a C function or a dump this reader does not know. */
static int l_global_reads(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_newtable(L);                         /* 2: the list */
  if (lua_iscfunction(L, 1)) return 1;
  lua_newtable(L);                         /* 3: the set */
  size_t size = 0;
  lua_pushvalue(L, 1);
  lua_dump(L, count_writer, &size, 0);
  lua_pop(L, 1);
  unsigned char *buf = lua_newuserdatauv(L, size ? size : 1, 0);   /* 4 */
  fill f = {buf, size};
  lua_pushvalue(L, 1);
  int failed = lua_dump(L, fill_writer, &f, 0);
  lua_pop(L, 1);
  if (failed || f.left != 0) { lua_settop(L, 2); return 1; }
  /* header: signature, version 0x54, format 0, LUAC_DATA, three sizes, LUAC_INT, LUAC_NUM */
  static const unsigned char head[] = {0x1b, 'L', 'u', 'a', 0x54, 0};
  const size_t header = sizeof head + 6 + 3 + 8 + 8;
  if (size < header + 1 || memcmp(buf, head, sizeof head) != 0 ||
      buf[sizeof head + 6] != 4) {           /* sizeof(Instruction) */
    lua_settop(L, 2);
    return 1;
  }
  reader r = {buf + header + 1, buf + size, 0};   /* + 1: the main upvalue count */
  if (!read_function(L, &r, 3, 2, 0)) {
    lua_settop(L, 2);
    lua_newtable(L);
    return 1;
  }
  lua_settop(L, 2);
  return 1;
}

int luamp_open_bytecode(lua_State *L) {
  lua_pushcfunction(L, l_global_reads);
  lua_setfield(L, -2, "global_reads");
  return 0;
}
