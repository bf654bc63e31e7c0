/* test_alloc_cache.c — alloc.c's cache of freed 1-4 KiB blocks over a state's allocator:
 * a freed block comes back for the next request of its size class, reallocation keeps
 * the bytes (in place within a class, moved across classes and out of the range), a
 * block that is not of its class's full size (allocated before the layer went on) is
 * never handed out again as one, and a state that churns strings and tables of these
 * sizes closes without leaking (run under AddressSanitizer by the sanitized suite). */
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#include <lualib.h>

#include "internal.h"
#include "test_util.h"

static int filled(const unsigned char *p, size_t n, unsigned char c) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != c) return 0;
  return 1;
}

static void direct_calls(void) {
  lua_State *L = luaL_newstate();
  /* a block from before the layer, at its exact size (malloc gives 1049 + a little) */
  void *ud0;
  lua_Alloc f0 = lua_getallocf(L, &ud0);
  unsigned char *early = f0(ud0, NULL, LUA_TSTRING, 1049);
  CHECK(early && malloc_usable_size(early) < 1088, "an exact-size block to start with");
  luamp_alloc_cache_on(L);
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  CHECK(f != f0, "the layer is on");
  luamp_alloc_cache_on(L);
  void *ud2;
  CHECK(lua_getallocf(L, &ud2) == f && ud2 == ud, "putting it on twice changes nothing");

  /* freed through the layer, the early block is not taken for a class-size one */
  f(ud, early, 1049, 0);
  unsigned char *a = f(ud, NULL, LUA_TSTRING, 1088);
  /* (malloc may give the same address back, merged with free space: the size tells) */
  CHECK(a && malloc_usable_size(a) >= 1088, "an exact-size block is not kept as a full one");
  memset(a, 'a', 1088);

  /* a freed block comes back for another size of its class */
  f(ud, a, 1088, 0);
  unsigned char *b = f(ud, NULL, LUA_TSTRING, 1049);
  CHECK(b == a, "the freed block is reused for its class");
  memset(b, 'b', 1049);
  /* growing within the class stays in place */
  unsigned char *c = f(ud, b, 1049, 1080);
  CHECK(c == b && filled(c, 1049, 'b'), "within its class a block grows in place");
  memset(c, 'c', 1080);
  /* across classes it moves, with its bytes */
  unsigned char *d = f(ud, c, 1080, 3000);
  CHECK(d && filled(d, 1080, 'c'), "across classes the bytes move along");
  memset(d, 'd', 3000);
  /* out of the range and back */
  unsigned char *e = f(ud, d, 3000, 9000);
  CHECK(e && filled(e, 3000, 'd'), "beyond the range the allocator underneath grows it");
  memset(e, 'e', 9000);
  unsigned char *g = f(ud, e, 9000, 2000);
  CHECK(g && filled(g, 2000, 'e'), "shrunk into the range, the bytes are kept");
  unsigned char *h = f(ud, g, 2000, 500);
  CHECK(h && filled(h, 500, 'e'), "shrunk below the range, the bytes are kept");
  f(ud, h, 500, 0);
  /* the bound of the range: 1024 and 4097 bytes are not the cache's */
  unsigned char *lo = f(ud, NULL, LUA_TSTRING, 1024), *hi = f(ud, NULL, LUA_TSTRING, 4097);
  CHECK(lo && hi, "sizes outside the range are allocated");
  f(ud, lo, 1024, 0);
  f(ud, hi, 4097, 0);
  /* many blocks freed: more than the lists keep, every one reusable or returned */
  enum { N = 2000 };
  static unsigned char *many[N];
  for (int i = 0; i < N; i++) {
    many[i] = f(ud, NULL, LUA_TSTRING, 1025 + (size_t)(i % 3000));
    CHECK(many[i] != NULL, "allocation %d", i);
    memset(many[i], i & 0xff, 1025 + (size_t)(i % 3000));
  }
  for (int i = 0; i < N; i++) {
    CHECK(filled(many[i], 1025 + (size_t)(i % 3000), (unsigned char)(i & 0xff)), "block %d kept", i);
    f(ud, many[i], 1025 + (size_t)(i % 3000), 0);
  }
  lua_close(L);   /* the layer goes with the state's last block (a leak shows under ASan) */
}

/* Lua churning strings and tables of these sizes: every value read back intact. */
static const char churn[] =
  "local keep = {}\n"
  "for round = 1, 40 do\n"
  "  for n = 900, 5000, 37 do\n"
  "    local s = string.rep(string.char(65 + n % 26), n)\n"
  "    keep[n % 97] = s\n"
  "    assert(#s == n and s:byte(n) == 65 + n % 26)\n"
  "  end\n"
  "  local t = {}\n"
  "  for i = 1, 300 do t[i] = i end\n"
  "  for i = 1, 300 do assert(t[i] == i) end\n"
  "  collectgarbage(round % 2 == 0 and 'step' or 'collect')\n"
  "end\n"
  "for k, s in pairs(keep) do assert(#s % 97 == k) end\n"
  "return 'ok'\n";

static void lua_churn(int generational) {
  lua_State *L = luaL_newstate();
  luamp_alloc_cache_on(L);
  luaL_openlibs(L);
  if (generational) lua_gc(L, LUA_GCGEN, 0, 0);
  int rc = luaL_dostring(L, churn);
  CHECK(rc == LUA_OK && lua_isstring(L, -1), "churn (%s): %s", generational ? "gen" : "inc",
        lua_tostring(L, -1));
  lua_close(L);
}

int main(void) {
  direct_calls();
  lua_churn(0);
  lua_churn(1);
  return test_done("test_alloc_cache");
}
