#!/usr/bin/env bash
# Checks scripts/test.sh itself (run by ctest as test_runner): given a directory of three
# spec files, one passing (with signals at their defaults), one hanging (with a child
# process of its own) and one failing, it must stream their results, name the hung file
# and the test it hung in with a TIMEOUT line, kill that run's whole process group,
# count the hang as a failure, and exit non-zero with the right summary line; and TERM
# to the runner must end the run it is in. While it runs, the runner (not the specs) holds
# the build directory's lock.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d "${TMPDIR:-/tmp}/luamp-selftest.XXXXXX")
trap 'rm -rf "$dir"' EXIT
fail() { echo "test_runner: $*"; echo "--- output:"; cat "$dir/out"; exit 1; }

cat > "$dir/a_pass_spec.lua" <<'EOF'
describe("a", function() it("passes", function()
  -- the specs' processes start with SIGINT and SIGQUIT at their defaults, not ignored
  -- as bash leaves them for background commands (a child shows what it inherited)
  local p = io.popen("grep SigIgn /proc/self/status")
  local ignored = tonumber(p:read("a"):match("SigIgn:%s*(%x+)"), 16)
  p:close()
  assert.equal(0, ignored & 6)
end) end)
EOF
cat > "$dir/b_hang_spec.lua" <<EOF
describe("b", function()
  it("passes first", function() end)
  it("hangs forever", function()
    -- a child in the run's process group, which the timeout must take down too
    os.execute("sleep 300 & echo \$! > '$dir/child.pid'")
    while true do end
  end)
end)
EOF
cat > "$dir/c_fail_spec.lua" <<'EOF'
describe("c", function() it("fails", function() assert.equal(1, 2) end) end)
EOF

start=$SECONDS
# the fake specs need no luamp: run them under stock lua5.4 in any build
env -u LUAMP_SANITIZE -u LUAMP_TEST_JOBS LUAMP_TEST_TIMEOUT=3 "$root/scripts/test.sh" "$dir" \
  > "$dir/out" 2>&1
rc=$?
elapsed=$((SECONDS - start))

((rc != 0)) || fail "exit status 0 despite a hang and a failure"
grep -qx "TIMEOUT $dir/b_hang_spec.lua after 3 s (in: b hangs forever, .*b_hang_spec.lua:3; 1 passed before)" \
  "$dir/out" || fail "no TIMEOUT line naming the hung file and test"
grep -q "^ok   $dir/a_pass_spec.lua: 1 passed" "$dir/out" || fail "passing file not reported"
grep -q "^FAILED .*c_fail_spec.lua:1: c fails" "$dir/out" || fail "failure not shown"
grep -q "^FAIL $dir/c_fail_spec.lua: 0 passed, 1 failed" "$dir/out" || fail "failing file not reported"
[[ $(tail -n 1 "$dir/out") == "2 passed, 2 failed" ]] || fail "wrong summary line"
# the order files ran in shows in the output as they finish
order=$(grep -E '^(ok   |FAIL |TIMEOUT )' "$dir/out" | cut -c1-4 | tr '\n' ' ')
[[ $order == "ok   TIME FAIL " ]] || fail "results out of order: $order"
[[ -s $dir/child.pid ]] || fail "the hanging spec did not start its child"
child=$(<"$dir/child.pid")
# killed means gone or a zombie (its new parent, init, may not have reaped it yet)
state=$(awk '{print $3}' "/proc/$child/stat" 2>/dev/null)
if [[ -n $state && $state != Z ]]; then
  kill "$child"
  fail "the hung run's child $child was left running"
fi
((elapsed < 30)) || fail "took $elapsed s for a 3 s limit"

# two files at a time: the same results, each line labelled with its file
rm -f "$dir/child.pid"
env -u LUAMP_SANITIZE LUAMP_TEST_JOBS=2 LUAMP_TEST_TIMEOUT=3 "$root/scripts/test.sh" "$dir" \
  > "$dir/out" 2>&1 && fail "exit status 0 with two files at a time"
grep -q "^\[b_hang\] TIMEOUT $dir/b_hang_spec.lua after 3 s (in: b hangs forever" "$dir/out" ||
  fail "no labelled TIMEOUT line with two files at a time"
grep -q "^\[c_fail\] FAILED " "$dir/out" || fail "no labelled failure with two files at a time"
[[ $(tail -n 1 "$dir/out") == "2 passed, 2 failed" ]] || fail "wrong summary with two files at a time"
child=$(<"$dir/child.pid")
state=$(awk '{print $3}' "/proc/$child/stat" 2>/dev/null)
if [[ -n $state && $state != Z ]]; then
  kill "$child"
  fail "the hung run's child $child was left running (two files at a time)"
fi

# TERM (or Ctrl-C) to the runner ends the spec run it is in, with its children, at once
rm -f "$dir/a_pass_spec.lua" "$dir/c_fail_spec.lua" "$dir/child.pid"
env -u LUAMP_SANITIZE -u LUAMP_TEST_JOBS LUAMP_TEST_TIMEOUT=60 "$root/scripts/test.sh" "$dir" \
  > "$dir/out" 2>&1 &
runner=$!
for _ in $(seq 300); do [[ -s $dir/child.pid ]] && break; sleep 0.1; done
[[ -s $dir/child.pid ]] || { kill "$runner"; fail "the hanging spec did not start"; }
# meanwhile the runner holds the build directory's lock (scripts/build.sh waits for it),
# and the spec's processes do not (one left behind would keep it)
build=${LUAMP_BUILD:-build}
[[ $build == /* ]] || build=$root/$build
holds() { local f; for f in /proc/"$1"/fd/*; do [[ $(readlink "$f") == "$build/.in-use" ]] && return 0; done; return 1; }
if [[ -d $build ]]; then
  holds "$runner" || { kill "$runner"; fail "the runner does not hold $build/.in-use"; }
  holds "$(<"$dir/child.pid")" && { kill "$runner"; fail "a spec's process holds $build/.in-use"; }
fi
kill -TERM "$runner"
wait "$runner"; rc=$?
((rc == 130)) || fail "runner ended with $rc after TERM, not 130"
child=$(<"$dir/child.pid")
state=$(awk '{print $3}' "/proc/$child/stat" 2>/dev/null)
if [[ -n $state && $state != Z ]]; then
  kill "$child"
  fail "TERM to the runner left the spec's child $child running"
fi
echo "test_runner: ok ($elapsed s)"
