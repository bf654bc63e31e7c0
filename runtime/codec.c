/* codec.c — placeholder until the codec lands: buffer helpers and no encoding. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

void luamp_buf_init(luamp_buf *b) { b->data = NULL; b->len = b->cap = 0; }

int luamp_buf_reserve(luamp_buf *b, size_t extra) {
  if (b->cap - b->len >= extra) return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap - b->len < extra) {
    if (cap > SIZE_MAX / 2) return -1;
    cap *= 2;
  }
  char *p = realloc(b->data, cap);
  if (!p) return -1;
  b->data = p;
  b->cap = cap;
  return 0;
}

void luamp_buf_free(luamp_buf *b) { free(b->data); luamp_buf_init(b); }

int luamp_encode(lua_State *L, int idx, luamp_buf *b) {
  (void)idx; (void)b;
  luamp_error_push(L, "Serialize", "codec not built");
  return -1;
}

int luamp_decode(lua_State *L, const char *data, size_t len) {
  (void)data; (void)len;
  luamp_error_push(L, "Serialize", "codec not built");
  return -1;
}

/* _core.register_handle(type_name, rebuild) */
static int l_register_handle(lua_State *L) {
  luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUAMP_HANDLES_KEY);
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  lua_rawset(L, -3);
  return 0;
}

int luamp_open_codec(lua_State *L) {
  lua_pushcfunction(L, l_register_handle);
  lua_setfield(L, -2, "register_handle");
  return 0;
}
