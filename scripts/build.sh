#!/usr/bin/env bash
# Installs the Debian packages luamp needs (only those missing), then builds into
# ${LUAMP_BUILD:-build}. LUAMP_SANITIZE=1 builds with ASan+UBSan. Run from anywhere: it
# works in the repository root it lives in.
set -euo pipefail
cd "$(dirname "$0")/.."
# to build: the compiler and CMake, Lua 5.4, libuv, libedit (the REPL's line editor),
# libsodium (manager authentication, broker message MACs);
# to test: busted (the specs), luarocks (spec/rockspec_spec.lua), python3 (the pty
# driver of the REPL specs and the Python side of scripts/bench); the broker: hiredis (the
# Redis protocol), redis-server (its specs start their own).
pkgs=(cmake gcc make pkg-config liblua5.4-dev lua5.4 libuv1-dev libedit-dev
      lua-busted luarocks python3 libhiredis-dev libsodium-dev redis-server)
scripts/apt-install.sh "${pkgs[@]}"
build=${LUAMP_BUILD:-build}
# Not while a test run uses this build directory (scripts/test.sh holds a shared lock on
# it): relinking $build/luamp under a running suite made the specs that exec it fail with
# "Permission denied" (exit 126), which looked like a flaky spec.
mkdir -p "$build"
exec 9> "$build/.in-use"
if ! flock -n -x 9; then
  echo "waiting for the test run that uses $build to end"
  flock -x 9
fi
cmake -S . -B "$build" -DLUAMP_SANITIZE="${LUAMP_SANITIZE:-0}" >/dev/null
cmake --build "$build" -j"$(nproc)"
