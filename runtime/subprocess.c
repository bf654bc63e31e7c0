/* subprocess.c — placeholder: filled in by its issue. */
#include "internal.h"

void luamp_subprocess_after_fork(void) {}

int luamp_open_subprocess(lua_State *L) { (void)L; return 0; }
