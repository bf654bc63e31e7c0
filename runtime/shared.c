/* shared.c — placeholder: filled in by its issue. */
#include "internal.h"

int luamp_open_shared(lua_State *L) { (void)L; return 0; }
