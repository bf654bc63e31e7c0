#!/usr/bin/env bash
# Runs every test against the build in ${LUAMP_BUILD:-build}: first the C unit tests
# (ctest; each has a TIMEOUT in CMakeLists.txt), then every spec/*_spec.lua as its own
# busted run under a time limit, and prints "N passed, M failed" (exit status 0 only
# when nothing failed).
#
#   scripts/test.sh                         everything
#   scripts/test.sh spec/pool_spec.lua      one spec file (or several, or a directory);
#                                           other arguments go to busted (--filter=...)
#
# Output streams: a header line when a spec file starts, each failure as it happens (see
# scripts/test_output.lua), a result line when it ends. A spec file still running at its
# limit is killed with its whole process group and reported as
#   TIMEOUT spec/x_spec.lua after 120 s (in: <test name>, spec/x_spec.lua:<line>)
# and counts as a failure. Anything a spec file leaves running is killed too, and said.
#
# Specs run under stock lua5.4 with build/luamp.so on the cpath; with LUAMP_SANITIZE=1
# under the sanitized luamp host instead, with every limit multiplied by 4.
# LUAMP_TEST_TIMEOUT overrides the default limit (seconds); LUAMP_TEST_JOBS=2 runs two
# spec files at a time (lines are then prefixed with the file's name).
set -uo pipefail
cd "$(dirname "$0")/.."
build=${LUAMP_BUILD:-build}
export LUAMP_BUILD=$build
# The run holds a shared lock on the build directory (descriptor 8), so that
# scripts/build.sh waits rather than relink what the specs are running (see there). The
# tests get the descriptor closed (8>&-): a process one leaves behind must not keep the
# lock after the run.
if [[ -d $build ]]; then
  exec 8> "$build/.in-use"
  flock -s 8
fi

# Seconds a spec file may take before it counts as hung. Files known to be slow get more.
default_limit=${LUAMP_TEST_TIMEOUT:-120}
declare -A limit_of=(
  [spec/pool_stress_spec.lua]=240
  [spec/ipc_stress_spec.lua]=240
  [spec/repl_spec.lua]=240                # a pty session per test
  [spec/rockspec_spec.lua]=360            # builds luamp with luarocks
)
scale=1
jobs=${LUAMP_TEST_JOBS:-1}

if [[ ${LUAMP_SANITIZE:-0} == 1 ]]; then
  runner=("$build/luamp" /usr/bin/busted)
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}
  scale=4
else
  runner=(lua5.4 /usr/bin/busted)
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/luamp-test.XXXXXX")
mkdir "$tmp/running"
# Spec runs have sessions of their own, out of reach of the terminal's Ctrl-C: on Ctrl-C
# or TERM the ones still running ($tmp/running/<pgid>) are killed here.
stop() {
  local g
  exec 2>/dev/null                                  # no job notices: we are leaving
  for g in "$tmp"/running/*; do
    [[ -e $g ]] || continue
    kill -KILL -- -"${g##*/}" 2>/dev/null
    kill -TERM "$(<"$g")" 2>/dev/null               # its watchdog
  done
  echo "interrupted"
  exit 130
}
trap stop INT TERM
trap 'rm -rf "$tmp"' EXIT
passed=0 failed=0

files=() busted_opts=()
for a in "$@"; do
  if [[ -d $a ]]; then
    while IFS= read -r f; do files+=("$f"); done < <(find "$a" -name '*_spec.lua' | sort)
  elif [[ -f $a ]]; then
    files+=("$a")
  else
    busted_opts+=("$a")
  fi
done

# ---- C unit tests --------------------------------------------------------------------
if (($# == 0)); then
  echo "== ctest"
  (cd "$build" && ctest --output-on-failure) 2>&1 8>&- | tee "$tmp/ctest.log"
  ctest_out=$(<"$tmp/ctest.log")
  if [[ $ctest_out =~ ([0-9]+)\ tests\ failed\ out\ of\ ([0-9]+) ]]; then
    failed=$((failed + BASH_REMATCH[1])); passed=$((passed + BASH_REMATCH[2] - BASH_REMATCH[1]))
  else
    echo "ctest did not run"; failed=$((failed + 1))
  fi
fi
((${#files[@]} == 0)) && files=(spec/*_spec.lua)

# ---- spec files ------------------------------------------------------------------------

# Runs one spec file; its output goes to stdout. Writes "<passed> <failed>" to $3.
run_spec() {
  local file=$1 limit=$2 result=$3
  local status=$result.status start=$SECONDS
  : > "$status"
  # setsid: the run is the leader of a process group of its own (test.sh runs without
  # job control, so setsid needs no fork and $! is that leader), which a timeout kills
  # as a whole, children included. env: bash starts background commands with SIGINT and
  # SIGQUIT ignored, which the specs' processes would inherit (the luamp host keeps an
  # inherited SIG_IGN, so its Ctrl-C specs would hang).
  LUAMP_TEST_STATUS=$status setsid env --default-signal=INT,QUIT "${runner[@]}" \
    --cpath="$build/?.so" --lpath="spec/?.lua" -o scripts/test_output.lua \
    "${busted_opts[@]}" "$file" 2>&1 8>&- &
  local pid=$!
  : > "$tmp/running/$pid"
  # the watchdog: kills the group at the limit; its sleep is ended with it when the run
  # finishes first, so nothing is left waiting
  (
    nap=
    trap '[[ -n $nap ]] && kill "$nap" 2>/dev/null; exit 0' TERM
    sleep "$limit" & nap=$!
    wait "$nap" || exit 0
    : > "$status.timeout"
    kill -KILL -- -"$pid" 2>/dev/null
  ) &
  local watchdog=$! rc timed_out=0
  echo "$watchdog" > "$tmp/running/$pid"
  wait "$pid" 2>/dev/null; rc=$?     # (quiet: the TIMEOUT line below says it all)
  kill -TERM "$watchdog" 2>/dev/null; wait "$watchdog"
  [[ -e $status.timeout ]] && timed_out=1
  # whatever the run left running in its group (an orphaned child) goes too. Zombies
  # (ended, waiting for init to reap them) do not count, and children on their way out
  # (a daemon ending with its parent) get a second to go.
  local left= tries=0
  # (kill -0 first: listing processes is slow, and the group is usually empty)
  while kill -0 -- -"$pid" 2>/dev/null; do
    left=$(ps -o pid=,stat=,args= -g "$pid" | awk '$2 !~ /^Z/')
    [[ -z $left ]] && break
    ((timed_out || ++tries > 10)) && break
    sleep 0.1; left=
  done
  if [[ -n $left ]]; then
    kill -KILL -- -"$pid" 2>/dev/null
    ((timed_out)) || printf 'LEFT RUNNING by %s (killed):\n%s\n' "$file" "$left"
  fi
  rm -f "$tmp/running/$pid"
  local counts name where p=0 f=0 e=0 state=none
  { read -r counts; read -r name; read -r where; } < "$status"
  [[ -n ${counts:-} ]] && read -r p f e _ state <<< "$counts"
  local secs=$((SECONDS - start))
  if ((timed_out)); then
    echo "TIMEOUT $file after $limit s (in: ${name:-?}, ${where:-?}; $p passed before)"
    echo "$p $((f + e + 1))" > "$result"
  elif [[ $state != done ]]; then
    echo "FAIL $file: busted ended with status $rc before finishing (in: ${name:-?}, ${where:-?}; $p passed before)"
    echo "$p $((f + e + 1))" > "$result"
  elif ((f + e > 0 || rc != 0)); then
    echo "FAIL $file: $p passed, $((f + e)) failed ($secs s)"
    echo "$p $((f + e > 0 ? f + e : 1))" > "$result"
  else
    echo "ok   $file: $p passed ($secs s)"
    echo "$p 0" > "$result"
  fi
}

# Lines of a file's output, prefixed with its name when files run side by side.
label() {
  if ((jobs > 1)); then
    local tag=${1##*/}; tag=${tag%_spec.lua}
    sed -u "s|^|[$tag] |"
  else
    cat
  fi
}

i=0
for file in "${files[@]}"; do
  i=$((i + 1))
  lim=$(( ${limit_of[$file]:-$default_limit} * scale ))
  if ((jobs > 1)); then
    while (($(jobs -rp | wc -l) >= jobs)); do wait -n; done
    { echo "-- $file"; run_spec "$file" "$lim" "$tmp/$i"; } 2>&1 | label "$file" &
  else
    echo "-- $file"
    run_spec "$file" "$lim" "$tmp/$i"
  fi
done
wait

for ((n = 1; n <= i; n++)); do
  read -r p f < "$tmp/$n" || { p=0; f=1; }
  passed=$((passed + p)); failed=$((failed + f))
done
echo "$passed passed, $failed failed"
((failed == 0))
