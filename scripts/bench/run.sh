#!/usr/bin/env bash
# Runs every benchmark in scripts/bench/ and ends with one table: figure, luamp, Python,
# raw C (or the peer the script names), ratio, goal, met or missed.
#
# Each benchmark prints its own report, then machine-readable lines
#   RESULT name=<figure> luamp=<num> python=<num|-> peer=<num|-> unit=<unit>
# which this script collects. Units ending in "/s" are rates (higher is better), every
# other unit (s, ms, us, ns, KiB) is a cost (lower is better). The goals live in the
# GOALS table below, one expression per figure, terms separated by spaces, all of which
# must hold:
#   python>=K   luamp is at least K times as fast (or as small) as Python
#   peer<=K     luamp's number over the peer's is at most K (costs: "at most K times raw C")
#   peer>=K     luamp's number over the peer's is at least K (rates: "at least K of the ring")
#   value<=K / value>=K   luamp's own number, in its unit
# The ratio column shows the first term's ratio. A figure without a goal is listed with "-".
#
# Usage: scripts/bench/run.sh [--quick] [name...]
#   --quick  smaller sizes and one round each (a few minutes; figures are noisier)
#   name...  only these scripts (pool sync queue ...); default: all of them
# Environment: LUAMP_BUILD (default build). Build first: scripts/build.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
quick=0
only=()
for a in "$@"; do
  case $a in
    --quick) quick=1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) only+=("$a") ;;
  esac
done

# The Pool figures' thread-pool peer is Debian's lua-luv (a Lua 5.4 module): installed
# here when missing and this is root with apt, else its columns read "-" and its goals n/a.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  scripts/apt-install.sh lua-luv || echo "lua-luv could not be installed: the luv columns will read -"
fi

declare -A GOALS=(
  [pool.map1m]="python>=5"
  [pool.chunksize1]="python>=10 value>=400000 peer>=1"
  [pool.apply_rt]="value<=16 peer<=1"
  [pool.cpu2]="peer<=0.556"
  [pool.oversub_map1m]="peer>=0.9"
  [pool.oversub_chunksize1]="peer>=0.9"
  [lock.pair]="peer<=1.0 python>=1"
  [counter.get_lock]="python>=10"
  [counter.lock]="peer<=4"
  [queue.small]="python>=20"
  [queue.small_worst]="python>=20"
  [queue.1k]="peer>=0.8"
  [queue.1m]="python>=10"
  [process.fork]="peer<=1.2 python>=5"
  [process.spawn]="peer<=1.5 python>=10"
  [process.forkserver]="peer<=2 python>=10"
  [pipe.roundtrip]="peer<=1.05"
  [subprocess.run]="peer<=1.3 python>=1"
  [manager.set]="peer<=1.5 python>=4"
  [manager.get]="peer<=1.5 python>=4"
  [manager.queue]="peer<=1.5 python>=4"
  [manager.start]="value<=5"
  [coro.switch]="peer<=3"
  [coro.queue]="peer>=0.8"
  [coro.cmds_wall]="python>=1"
  [coro.cmds_cpu]="python>=1"
)

# name, then the full and the quick arguments (quick mode also sets ROUNDS=1)
benches=(
  "pool||"
  "sync|2000000 100000|200000 100000"
  "queue|200000|50000"
  "process|2000 100 500|300 20 100"
  "pipe|20000|5000"
  "pipe_large||"
  "memory||"
  "codec||"
  "handles|2000 20000|300 2000"
  "manager|5000|1000"
  "subprocess|1000|200"
  "broker|10000|2000"
  "coro||"
  "forkserver||"
)

log=$(mktemp); trap 'rm -f "$log"' EXIT
t_start=$(date +%s)
for b in "${benches[@]}"; do
  IFS='|' read -r name full short <<<"$b"
  script=scripts/bench/$name.sh
  [[ -x $script || -f $script ]] || continue
  if ((${#only[@]})); then
    want=0
    for o in "${only[@]}"; do [[ $o == "$name" ]] && want=1; done
    ((want)) || continue
  fi
  args=$full
  ((quick)) && args=$short
  echo "==== $name.sh $args ($(date +%T))"
  if ((quick)); then
    # shellcheck disable=SC2086
    ROUNDS=1 RQ_N=200 bash "$script" $args 2>&1 | tee -a "$log"
  else
    # shellcheck disable=SC2086
    bash "$script" $args 2>&1 | tee -a "$log"
  fi
  rc=${PIPESTATUS[0]}
  ((rc == 0)) || echo "RESULT name=$name.FAILED luamp=- python=- peer=- unit=exit$rc" | tee -a "$log"
  echo
done

goal_lines=$(for k in "${!GOALS[@]}"; do printf '%s\t%s\n' "$k" "${GOALS[$k]}"; done)
echo "==== summary ($(( $(date +%s) - t_start )) s; load average $(cut -d' ' -f1-3 /proc/loadavg))"
grep '^RESULT ' "$log" | awk -v goals="$goal_lines" '
function num(s) { return s ~ /^[-+]?[0-9.]+([eE][-+]?[0-9]+)?$/ }
function fmt(x) {
  if (!num(x)) return x
  if (x + 0 >= 100000) return sprintf("%.3g", x)
  if (x + 0 >= 100) return sprintf("%.0f", x)
  return sprintf("%.4g", x)
}
BEGIN {
  n = split(goals, gl, "\n")
  for (i = 1; i <= n; i++) { split(gl[i], kv, "\t"); goal[kv[1]] = kv[2] }
  printf "%-26s %10s %10s %10s %-8s %12s  %-26s %s\n", "figure", "luamp", "python", "C/peer", "unit", "ratio", "goal", "result"
}
{
  delete f
  for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
  name = f["name"]; l = f["luamp"]; p = f["python"]; c = f["peer"]; u = f["unit"]
  rate = u ~ /\/s$/
  g = (name in goal) ? goal[name] : ""
  ratio = "-"; verdict = "-"
  if (g != "") {
    verdict = "met"
    nt = split(g, terms, " ")
    for (t = 1; t <= nt; t++) {
      if (!match(terms[t], /(<=|>=)/)) { verdict = "bad goal"; continue }
      who = substr(terms[t], 1, RSTART - 1); op = substr(terms[t], RSTART, 2)
      k = substr(terms[t], RSTART + 2) + 0
      r = ""
      if (who == "python" && num(p) && num(l) && l + 0 > 0 && p + 0 > 0)
        r = rate ? l / p : p / l
      else if (who == "peer" && num(c) && num(l) && c + 0 > 0)
        r = l / c
      else if (who == "value" && num(l))
        r = l + 0
      if (r == "") { verdict = "n/a"; continue }
      if (t == 1) ratio = sprintf("%.3g%s", r, who == "value" ? "" : "x " (who == "python" ? "py" : "peer"))
      ok = op == "<=" ? r <= k : r >= k
      if (!ok && verdict == "met") verdict = "MISSED"
    }
  }
  printf "%-26s %10s %10s %10s %-8s %12s  %-26s %s\n", name, fmt(l), fmt(p), fmt(c), u, ratio, (g == "" ? "-" : g), verdict
}'
