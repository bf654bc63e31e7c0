#!/usr/bin/env bash
# luamp.dumps/loads vs Python's pickle (protocol 5) on the same data, from one run:
# a 100k-integer array, 10k small records, a 10 MB string and a 3-element table.
# Prints per-operation time, throughput over the encoded size, and luamp's speedup
# (pickle time / luamp time: above 1 means luamp is faster). CPU time per operation,
# best over ROUNDS (default 3) alternating runs of each side.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${LUAMP_BUILD:-build}
here=scripts/bench
# The machine is shared: run the two sides alternately a few times, keep each best.
rounds=${ROUNDS:-3}
lua_all="" py_all=""
for ((r = 0; r < rounds; r++)); do
  lua_all+=$(LUA_CPATH="$build/?.so;;" lua5.4 "$here/codec.lua")$'\n'
  py_all+=$(python3 "$here/codec.py")$'\n'
done
best() { awk 'NF { if (!($1 in d) || $2 < d[$1]) d[$1] = $2; if (!($1 in l) || $3 < l[$1]) l[$1] = $3; b[$1] = $4; n[$1] = $5 }
              END { for (k in d) print k, d[k], l[k], b[k], n[k] }'; }
lua_out=$(best <<<"$lua_all")
py_out=$(best <<<"$py_all")
results=$(mktemp); trap 'rm -f "$results"' EXIT
printf '%-12s %-6s %12s %12s %10s %10s %8s\n' case op luamp_us pickle_us luamp_MB/s pickle_MB/s speedup
join <(sort <<<"$lua_out") <(sort <<<"$py_out") | while read -r name ld ll lb _ pd pl pb _; do
  for op in dumps loads; do
    if [[ $op == dumps ]]; then lt=$ld pt=$pd; else lt=$ll pt=$pl; fi
    awk -v n="$name" -v op="$op" -v lt="$lt" -v pt="$pt" -v lb="$lb" -v pb="$pb" 'BEGIN {
      printf "%-12s %-6s %12.2f %12.2f %10.1f %10.1f %7.2fx\n", n, op, lt * 1e6, pt * 1e6,
        lb / lt / 1e6, pb / pt / 1e6, pt / lt
      printf "RESULT name=codec.%s.%s luamp=%.2f python=%.2f peer=- unit=us\n", n, op, lt * 1e6, pt * 1e6 > "/dev/stderr" }' 2>>"$results"
  done
done
echo "encoded sizes (bytes): $(awk '{printf "%s luamp=%s ", $1, $4}' <<<"$lua_out")"
echo "                       $(awk '{printf "%s pickle=%s ", $1, $4}' <<<"$py_out")"
# machine-readable lines for scripts/bench/run.sh
cat "$results"
