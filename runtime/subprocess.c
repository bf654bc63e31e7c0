/* subprocess.c — placeholder: filled in by its issue. */
#include "internal.h"

int luamp_open_subprocess(lua_State *L) { (void)L; return 0; }
