/*
 * main.c — the luamp program: lua5.4's command line with luamp built in.
 *
 *   luamp [options] [script [args]]
 *
 * behaves like lua5.4 (same options, `arg` table, LUA_INIT, script from stdin, REPL on a
 * terminal) with the luamp module opened as the global `luamp`. It uses only the public
 * interface (luamp.h), as any embedding host would.
 *
 * Everything runs inside one protected call (protected_main) so that a failure while
 * setting up is reported like a script error, and lua_close always runs at the end: it
 * joins the children the program left running. User code runs through
 * luamp_pcall_interruptible, so Ctrl-C stops it with luamp.Interrupted; an Interrupted
 * error nobody caught makes the exit status 130, as for a shell job killed by SIGINT.
 *
 * Subcommands (`luamp <name> ...`) are looked up in `subcommands` before the
 * interpreter's options are parsed; the table is where later ones go.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "luamp.h"

/* runtime/alloc.c (base.h): freed 1-4 KiB blocks kept for reuse, in front of the
 * state's allocator; glibc's own cache stops at 1032 bytes, a 1 KiB Lua string is 1049 */
void luamp_alloc_cache_on(lua_State *L);

#define PROGNAME "luamp"
#define EXIT_INTERRUPTED 130

/* ---- subcommands ---------------------------------------------------------------------- */

typedef struct subcommand {
  const char *name;
  int (*run)(int argc, char **argv);    /* argv[0] is the subcommand's name */
} subcommand;

static int run_worker(int argc, char **argv);

static const subcommand subcommands[] = {
  {"worker", run_worker},     /* luamp worker --broker URL ...: lua/luamp/worker.lua */
  {NULL, NULL}
};

static const subcommand *find_subcommand(const char *name) {
  for (const subcommand *s = subcommands; s->name; s++)
    if (strcmp(s->name, name) == 0) return s;
  return NULL;
}

/* ---- the command line ------------------------------------------------------------------ */

enum { OPT_I = 1, OPT_V = 2, OPT_E = 4, OPT_NOENV = 8 };

typedef struct options {
  int flags;
  int script;       /* argv index of the script; 0 if none */
  int bad;          /* argv index of an unusable argument; 0 if none */
  int optlim;       /* options are argv[1 .. optlim-1] */
} options;

/* Which options were given and where the script is, as lua.c reads them: options end
 * at the first argument not starting with '-', at "--", or at "-" (the script is stdin). */
static options parse_options(int argc, char **argv) {
  options o = {0, 0, 0, argc};
  int i;
  for (i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (a[0] != '-') break;
    if (a[1] == '-') {                                 /* "--" */
      if (a[2]) { o.bad = i; return o; }
      i++;
      break;
    }
    if (a[1] == '\0') break;                           /* "-" */
    switch (a[1]) {
      case 'i': o.flags |= OPT_I; break;
      case 'v': o.flags |= OPT_V; break;
      case 'E': o.flags |= OPT_NOENV; break;
      case 'W': break;
      case 'e': o.flags |= OPT_E; /* FALLTHROUGH */
      case 'l':
        if (a[2] == '\0') {                            /* the argument is the next word */
          i++;
          if (i >= argc || argv[i][0] == '-') { o.bad = i - 1; return o; }
        }
        continue;
      default: o.bad = i; return o;
    }
    if (a[2]) { o.bad = i; return o; }                 /* "-ix" */
  }
  o.script = i < argc ? i : 0;
  o.optlim = i;
  return o;
}

static void print_usage(const char *bad) {
  if (bad[0] == '-' && (bad[1] == 'e' || bad[1] == 'l'))
    fprintf(stderr, PROGNAME ": '%s' needs argument\n", bad);
  else
    fprintf(stderr, PROGNAME ": unrecognized option '%s'\n", bad);
  fprintf(stderr,
    "usage: " PROGNAME " [options] [script [args]]\n"
    "Available options are:\n"
    "  -e stat   execute string 'stat'\n"
    "  -i        enter interactive mode after executing 'script'\n"
    "  -l mod    require library 'mod' into global 'mod'\n"
    "  -l g=mod  require library 'mod' into global 'g'\n"
    "  -v        show version information\n"
    "  -E        ignore environment variables\n"
    "  -W        turn warnings on\n"
    "  --        stop handling options\n"
    "  -         stop handling options and execute stdin\n");
}

static void print_version(void) {
  printf(PROGNAME " %s (%s)\n", LUAMP_VERSION, LUA_RELEASE);
  fflush(stdout);
}

/* arg[0] is the script, arg[1..] its arguments, arg[-1..] the interpreter's words. With
 * no script every word has a positive index and arg[0] is the program. */
static void create_arg_table(lua_State *L, int argc, char **argv, int script) {
  lua_createtable(L, argc - script, script + 1);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - script);
  }
  lua_setglobal(L, "arg");
}

/* ---- running code ------------------------------------------------------------------- */

static int interrupted;     /* the last uncaught error was a luamp.Interrupted */

static int is_interrupt(lua_State *L, int idx) {
  if (!lua_istable(L, idx)) return 0;
  int yes = 0;
  if (luaL_getmetafield(L, idx, "__name") != LUA_TNIL) {
    lua_pushliteral(L, "kind");
    lua_rawget(L, idx);
    const char *name = lua_tostring(L, -2), *kind = lua_tostring(L, -1);
    yes = name && kind && strcmp(name, "luamp.Error") == 0 && strcmp(kind, "Interrupted") == 0;
    lua_pop(L, 2);
  }
  return yes;
}

/* Message handler: the error as text plus traceback (luamp_traceback: any error value
 * reads well, a Remote error shows the worker's traceback as its cause). */
static int traceback_handler(lua_State *L) {
  interrupted = is_interrupt(L, 1);
  return luamp_traceback(L);
}

/* Exit status for a call's outcome, reporting a failure on stderr. */
static int report(lua_State *L, int status) {
  if (status == LUA_OK) return EXIT_SUCCESS;
  const char *msg = lua_tostring(L, -1);
  fflush(stdout);
  fprintf(stderr, PROGNAME ": %s\n", msg ? msg : "(error object is not a string)");
  fflush(stderr);
  lua_pop(L, 1);
  int rc = interrupted ? EXIT_INTERRUPTED : EXIT_FAILURE;
  interrupted = 0;
  return rc;
}

/* Calls the function below its nargs arguments, with Ctrl-C able to stop it. */
static int docall(lua_State *L, int nargs, int nresults) {
  int base = lua_gettop(L) - nargs;
  lua_pushcfunction(L, traceback_handler);
  lua_insert(L, base);
  interrupted = 0;
  int status = luamp_pcall_interruptible(L, nargs, nresults, base);
  lua_remove(L, base);
  return status;
}

static int dochunk(lua_State *L, int status) {
  if (status == LUA_OK) status = docall(L, 0, 0);
  return report(L, status);
}

static int dofile(lua_State *L, const char *name) {
  return dochunk(L, luaL_loadfile(L, name));
}

static int dostring(lua_State *L, const char *s, const char *chunkname) {
  return dochunk(L, luaL_loadbuffer(L, s, strlen(s), chunkname));
}

/* -l mod or -l g=mod: global g (or mod) = require "mod" */
static int dolibrary(lua_State *L, const char *spec) {
  const char *eq = strchr(spec, '=');
  const char *mod = eq ? eq + 1 : spec;
  lua_getglobal(L, "require");
  lua_pushstring(L, mod);
  int status = docall(L, 1, 1);
  if (status == LUA_OK) {
    if (eq) lua_pushlstring(L, spec, (size_t)(eq - spec));
    else lua_pushstring(L, spec);
    lua_insert(L, -2);
    lua_setglobal(L, lua_tostring(L, -2));
    lua_pop(L, 1);
  }
  return report(L, status);
}

static int handle_luainit(lua_State *L) {
  const char *name = "=LUA_INIT_5_4";
  const char *init = getenv(name + 1);
  if (!init) {
    name = "=LUA_INIT";
    init = getenv(name + 1);
  }
  if (!init) return EXIT_SUCCESS;
  if (init[0] == '@') return dofile(L, init + 1);
  return dostring(L, init, name);
}

/* -e, -l and -W in command-line order; stops at the first failure. */
static int run_options(lua_State *L, char **argv, int optlim) {
  for (int i = 1; i < optlim; i++) {
    const char *a = argv[i];
    if (a[0] != '-') continue;
    int opt = a[1];
    if (opt == 'W') {
      lua_warning(L, "@on", 0);
      continue;
    }
    if (opt != 'e' && opt != 'l') continue;
    const char *extra = a[2] ? a + 2 : argv[++i];
    int rc = opt == 'e' ? dostring(L, extra, "=(command line)") : dolibrary(L, extra);
    if (rc != EXIT_SUCCESS) return rc;
  }
  return EXIT_SUCCESS;
}

/* The script with its arguments (arg[1..#arg]) passed as `...`. */
static int handle_script(lua_State *L, char **argv, int script) {
  const char *fname = argv[script];
  if (strcmp(fname, "-") == 0 && strcmp(argv[script - 1], "--") != 0) fname = NULL;
  int status = luaL_loadfile(L, fname);
  if (status == LUA_OK) {
    if (lua_getglobal(L, "arg") != LUA_TTABLE) luaL_error(L, "'arg' is not a table");
    int n = (int)luaL_len(L, -1);
    luaL_checkstack(L, n + 3, "too many arguments to script");
    for (int i = 1; i <= n; i++) lua_rawgeti(L, -i, i);
    lua_remove(L, -n - 1);
    status = docall(L, n, 0);
  }
  return report(L, status);
}

/* Everything the program does, in protected mode; returns the exit status. */
static int protected_main(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = lua_touserdata(L, 2);
  options o = parse_options(argc, argv);
  if (o.bad) {
    print_usage(argv[o.bad]);
    lua_pushinteger(L, EXIT_FAILURE);
    return 1;
  }
  if (o.flags & OPT_V) print_version();
  if (o.flags & OPT_NOENV) {           /* the package library then ignores LUA_PATH... */
    lua_pushboolean(L, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, "LUA_NOENV");
  }
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  create_arg_table(L, argc, argv, o.script);
  lua_gc(L, LUA_GCRESTART);
  lua_gc(L, LUA_GCGEN, 0, 0);
  int rc = EXIT_SUCCESS;
  if (!(o.flags & OPT_NOENV)) rc = handle_luainit(L);
  if (rc == EXIT_SUCCESS) rc = run_options(L, argv, o.optlim);
  if (rc == EXIT_SUCCESS && o.script) rc = handle_script(L, argv, o.script);
  if (rc == EXIT_SUCCESS) {
    if (o.flags & OPT_I)
      luamp_repl(L);
    else if (!o.script && !(o.flags & (OPT_E | OPT_V))) {
      if (isatty(STDIN_FILENO)) luamp_repl(L);
      else rc = dofile(L, NULL);       /* `echo 'print(1)' | luamp` */
    }
  }
  lua_pushinteger(L, rc);
  return 1;
}

/* So that a fresh luamp process (spawn start method) runs this same program. */
static void set_executable(const char *argv0) {
  char path[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", path, sizeof path - 1);
  if (n > 0) {
    path[n] = '\0';
    luamp_set_executable(path);
  } else if (argv0 && strchr(argv0, '/')) {
    luamp_set_executable(argv0);
  }
}

static int run_interpreter(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  if (!L) {
    fprintf(stderr, PROGNAME ": cannot create state: not enough memory\n");
    return EXIT_FAILURE;
  }
  luamp_alloc_cache_on(L);
  set_executable(argv[0]);
  lua_gc(L, LUA_GCSTOP);               /* no collection while the state is being built */
  lua_pushcfunction(L, protected_main);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  int status = lua_pcall(L, 2, 1, 0);
  int rc;
  if (status == LUA_OK) {
    rc = (int)lua_tointeger(L, -1);
  } else {
    const char *msg = lua_tostring(L, -1);
    fprintf(stderr, PROGNAME ": %s\n", msg ? msg : "(error object is not a string)");
    rc = EXIT_FAILURE;
  }
  lua_close(L);
  return rc;
}

/* `luamp worker ...`: the broker's worker program, written in Lua (luamp.worker). It
 * handles SIGINT/SIGTERM itself (finishing its tasks), so no interruptible call here. */
static int protected_worker(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = lua_touserdata(L, 2);
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  lua_gc(L, LUA_GCRESTART);
  lua_gc(L, LUA_GCGEN, 0, 0);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "luamp.worker");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "main");
  lua_createtable(L, argc, 0);
  for (int i = 1; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_call(L, 1, 1);
  lua_pushinteger(L, lua_isinteger(L, -1) ? lua_tointeger(L, -1) : EXIT_SUCCESS);
  return 1;
}

static int run_worker(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  if (!L) {
    fprintf(stderr, PROGNAME " worker: cannot create state: not enough memory\n");
    return EXIT_FAILURE;
  }
  luamp_alloc_cache_on(L);
  set_executable(NULL);
  lua_gc(L, LUA_GCSTOP);
  lua_pushcfunction(L, protected_worker);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  int rc;
  if (lua_pcall(L, 2, 1, 0) == LUA_OK) {
    rc = (int)lua_tointeger(L, -1);
  } else {
    const char *msg = luaL_tolstring(L, -1, NULL);
    fprintf(stderr, PROGNAME " worker: %s\n", msg ? msg : "(error)");
    rc = EXIT_FAILURE;
  }
  lua_close(L);
  return rc;
}

int main(int argc, char **argv) {
  luamp_child_main(argc, argv);        /* a spawn child runs here and never returns */
  if (argc < 1 || !argv[0]) {
    static char *fallback[] = {PROGNAME, NULL};
    argc = 1;
    argv = fallback;
  }
  if (argc > 1) {
    const subcommand *s = find_subcommand(argv[1]);
    if (s) return s->run(argc - 1, argv + 1);
  }
  return run_interpreter(argc, argv);
}
