/*
 * luamp.h — the public C interface of luamp, for hosts that embed it.
 *
 * A host opens the module like any Lua library:
 *     luaL_requiref(L, "luamp", luaopen_luamp, 0);
 * luamp installs no process-wide signal handler behind the host's back and reaps only
 * the children it started itself.
 */
#ifndef LUAMP_H
#define LUAMP_H

#include <lua.h>

#define LUAMP_VERSION "0.1.0"

struct uv_loop_s;

/* Opens the module: returns 1 value, the luamp table. */
int luaopen_luamp(lua_State *L);

/* Shares the host's libuv loop with luamp (call before opening; NULL: no loop shared).
 * luamp never runs that loop (nor uv_default_loop()): its blocking calls use a private
 * loop, so when made from a host callback they block that callback and nothing more. It
 * only adds unref'd handles to the host's loop through which pool results and callbacks
 * arrive while the host runs it; they are closed when the Lua state is, so one more
 * uv_run after lua_close lets the host close the loop. */
void luamp_set_loop(struct uv_loop_s *loop);

/* The program that re-enters luamp in a fresh process (spawn start method). Defaults to
 * the running executable when that is the luamp host. The string is copied. */
void luamp_set_executable(const char *path);

/* Call first thing in main(). In a process started as a luamp child (spawn start
 * method: the host's executable re-entered with luamp's own arguments) it runs that
 * child in a fresh Lua state (standard libraries and luamp opened) and exits; otherwise
 * it returns at once and main goes on as usual (Python's freeze_support). */
void luamp_child_main(int argc, char **argv);

/* Runs the interactive read-eval-print loop on L (which must have luamp opened) until
 * end of input. Returns 0 on a normal end. While a statement runs, Ctrl-C interrupts it
 * (as luamp_pcall_interruptible); at the prompt, Ctrl-C discards the line being typed.
 * On a terminal it edits lines with libedit and keeps history in $LUAMP_HISTORY, else
 * ~/.luamp_history (LUAMP_HISTORY="" keeps none); otherwise it reads plain lines and
 * prints no prompts. */
int luamp_repl(lua_State *L);

/* lua_pcall during which Ctrl-C (SIGINT) stops the call with a luamp.Interrupted error,
 * whether the code is running Lua or blocked in a luamp wait (sleep, join, get...). The
 * SIGINT handler exists only for the duration of the call and the previous one is put
 * back after; a SIGINT disposition of SIG_IGN is left alone. Lua code running in another
 * coroutine than L is stopped only when it next waits (as in lua.c). */
int luamp_pcall_interruptible(lua_State *L, int nargs, int nresults, int msgh);

/* A message handler for lua_pcall / luamp_pcall_interruptible: returns the error as text
 * with a traceback. Any error value reads well: a table raised as an error shows its
 * `message` or `msg` field (else a pformat of it); a luamp.Remote error shows the
 * worker's traceback first, then "The above error in a worker was the direct cause of
 * the following error:" and the local traceback. */
int luamp_traceback(lua_State *L);

/* Async-signal-safe: for hosts with their own SIGINT handler. Makes the current (or the
 * next) luamp wait end with a luamp.Interrupted error. */
void luamp_request_interrupt(void);

#endif
