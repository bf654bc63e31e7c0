/* queue.c — placeholder: filled in by its issue. */
#include "internal.h"

int luamp_open_queue(lua_State *L) { (void)L; return 0; }
