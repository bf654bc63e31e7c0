#!/usr/bin/env bash
# Runs every test: the C unit tests (ctest) and the busted specs in spec/, against the
# build in ${LUAMP_BUILD:-build}. Specs run under stock lua5.4 with build/luamp.so on the
# cpath; with LUAMP_SANITIZE=1 they run under the sanitized luamp host instead.
# Extra arguments go to busted (e.g. scripts/test.sh spec/process_spec.lua).
set -uo pipefail
cd "$(dirname "$0")/.."
build=${LUAMP_BUILD:-build}
export LUAMP_BUILD=$build
passed=0 failed=0

if (($# == 0)); then
  ctest_out=$(cd "$build" && ctest --output-on-failure 2>&1); echo "$ctest_out"
  if [[ $ctest_out =~ ([0-9]+)\ tests\ failed\ out\ of\ ([0-9]+) ]]; then
    failed=$((failed + BASH_REMATCH[1])); passed=$((passed + BASH_REMATCH[2] - BASH_REMATCH[1]))
  fi
fi

if [[ ${LUAMP_SANITIZE:-0} == 1 ]]; then
  runner=("$build/luamp" /usr/bin/busted)
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}
else
  runner=(lua5.4 /usr/bin/busted)
fi
spec_out=$("${runner[@]}" --cpath="$build/?.so" --lpath="spec/?.lua" -o utfTerminal "${@:-spec}" 2>&1)
rc=$?
echo "$spec_out"
if [[ $spec_out =~ ([0-9]+)\ success[a-z]*\ /\ ([0-9]+)\ failure[a-z]*\ /\ ([0-9]+)\ error ]]; then
  passed=$((passed + BASH_REMATCH[1])); failed=$((failed + BASH_REMATCH[2] + BASH_REMATCH[3]))
else
  failed=$((failed + 1))
fi
((rc != 0 && failed == 0)) && failed=1
echo "$passed passed, $failed failed"
((failed == 0))
