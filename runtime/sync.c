/* sync.c — placeholder: filled in by its issue. */
#include "internal.h"

int luamp_open_sync(lua_State *L) { (void)L; return 0; }
