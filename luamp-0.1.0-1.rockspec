-- `luarocks --lua-version 5.4 make` in a clone of luamp builds it with CMake and installs
-- luamp.so (require "luamp") and the luamp program into the rocks tree. It needs the
-- C libraries below with their headers (Debian: libuv1-dev libedit-dev
-- libhiredis-dev libsodium-dev liblua5.4-dev),
-- cmake and pkg-config. spec/packaging_spec.lua checks it in a throwaway tree.
rockspec_format = "3.0"
package = "luamp"
version = "0.1.0-1"
source = {
   -- luamp has no public home yet: `luarocks make` builds the clone it is run in and
   -- never fetches this.
   url = "git+file:///dev/null",
}
description = {
   summary = "Python's multiprocessing and subprocess for Lua 5.4",
   detailed = [[
Processes, pools, queues, pipes, locks, shared memory and external programs across
processes, with the API of Python's multiprocessing and subprocess, on a C core (libuv,
memfd, futexes, pidfds). Linux only.]],
   labels = {"multiprocessing", "subprocess", "parallel", "ipc"},
}
supported_platforms = {"linux"}
dependencies = {"lua >= 5.4, < 5.5"}
external_dependencies = {
   LIBUV = {header = "uv.h"},
   LIBEDIT = {header = "histedit.h"},
   HIREDIS = {header = "hiredis/hiredis.h"},
   SODIUM = {header = "sodium.h"},
}
build = {
   type = "cmake",
   variables = {
      CMAKE_BUILD_TYPE = "Release",
      CMAKE_INSTALL_PREFIX = "$(PREFIX)",
      CMAKE_INSTALL_BINDIR = "$(BINDIR)",
      CMAKE_INSTALL_MANDIR = "$(PREFIX)/doc/man",
      LUAMP_LUA_CMOD_DIR = "$(LIBDIR)",
      LUAMP_INSTALL_DEV = "OFF",
      BUILD_TESTING = "OFF",
   },
}
