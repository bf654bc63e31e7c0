/* repl.c — placeholder until the REPL lands. */
#include <stdio.h>
#include "internal.h"

int luamp_repl(lua_State *L) { (void)L; fputs("luamp: no REPL in this build\n", stderr); return 1; }
int luamp_open_repl(lua_State *L) { (void)L; return 0; }
