#!/usr/bin/env bash
# The broker (issue 15): luamp.Pool{broker=...} with 2 `luamp worker` processes vs Python
# RQ (default workers, 2 of them) and Celery (Redis broker and result backend, prefork 2),
# all on one private redis-server, one run:
#   1. tiny tasks: apply_async(x*x) for N items (10,000), then every get: tasks/s
#   2. map over 1,000,000 items with chunksize 1,000 (luamp only), next to the local Pool(2)
# RQ and Celery come from Debian (python3-rq, python3-celery; installed here when missing and
# running as root); without them their rows say so. RQ forks a process per job, so it gets
# fewer tasks (RQ_N, default 1,000).
# Usage: scripts/bench/broker.sh [N]   (build first)
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-10000}
rq_n=${RQ_N:-1000}
root=$PWD
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

py=/usr/bin/python3
have_py() { "$py" -c "import $1" 2>/dev/null; }
if ! have_py rq || ! have_py celery; then
  if [[ $(id -u) == 0 ]]; then
    scripts/apt-install.sh python3-rq python3-celery >/dev/null 2>&1 || true
  fi
fi

port=$(( 20000 + RANDOM % 30000 ))
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
  --logfile "$tmp/redis.log" & pids+=($!)
for _ in $(seq 200); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
url="redis://127.0.0.1:$port/0"

echo "machine: $(nproc) cores; redis $(redis-server --version | awk '{print $3}')"
echo

# ---- luamp ----
build/luamp worker --broker "$url" --queue bench --authkey k --processes 2 2>"$tmp/worker.log" & pids+=($!)
cat > "$tmp/luamp.lua" <<'L'
local luamp = require "luamp"
local url, n = arg[1], tonumber(arg[2])
local pool = luamp.Pool{broker = url, queue = "bench", authkey = "k"}
pool:map(function(x) return x end, {1, 2, 3, 4})          -- the workers are up
local sq = function(x) return x * x end
local t0 = luamp.time()
local rs = {}
for i = 1, n do rs[i] = pool:apply_async(sq, {i}) end
for i = 1, n do assert(rs[i]:get() == i * i) end
local dt = luamp.time() - t0
print(string.format("luamp broker   tiny tasks: %6d in %6.2f s = %8.0f tasks/s", n, dt, n / dt))
local rate = n / dt
local big = {}
for i = 1, 1000000 do big[i] = i end
t0 = luamp.time()
local r = pool:map(function(x) return x + 1 end, big, 1000)
assert(#r == 1000000 and r[1000000] == 1000001)
local bt = luamp.time() - t0
print(string.format("luamp broker   1M items, chunksize 1000: %6.2f s", bt))
pool:terminate()
local lp = luamp.Pool(2)
t0 = luamp.time()
lp:map(function(x) return x + 1 end, big, 1000)
local lt = luamp.time() - t0
lp:terminate()
print(string.format("luamp Pool(2)  1M items, chunksize 1000: %6.2f s (broker/local = %.2fx)", lt, bt / lt))
local f = assert(io.open(arg[3] .. "/luamp.res", "w"))
f:write(string.format("%.0f %.3f %.3f\n", rate, bt, lt))
f:close()
L
build/luamp "$tmp/luamp.lua" "$url" "$n" "$tmp"

# ---- RQ ----
if have_py rq; then
  cat > "$tmp/rqtasks.py" <<'P'
def sq(x):
    return x * x
P
  cat > "$tmp/rq_bench.py" <<'P'
import sys, time
from redis import Redis
from rq import Queue
from rqtasks import sq
conn = Redis.from_url(sys.argv[1]); n = int(sys.argv[2])
q = Queue("bench", connection=conn)
t0 = time.time()
jobs = [q.enqueue(sq, i) for i in range(n)]
for i, j in enumerate(jobs):
    while j.get_status(refresh=True) != "finished":
        time.sleep(0.001)
    assert j.result == i * i
dt = time.time() - t0
print("RQ (2 workers) tiny tasks: %6d in %6.2f s = %8.0f tasks/s" % (n, dt, n / dt))
open("rq.res", "w").write("%.0f\n" % (n / dt))
P
  for _ in 1 2; do (cd "$tmp" && exec "$py" -m rq.cli worker -u "$url" bench -q >/dev/null 2>&1) & pids+=($!); done
  (cd "$tmp" && "$py" rq_bench.py "$url" "$rq_n")
else
  echo "RQ: python3-rq not installed (apt-get install python3-rq); not measured"
fi

# ---- Celery ----
if have_py celery; then
  cat > "$tmp/celtasks.py" <<P
from celery import Celery
app = Celery("celtasks", broker="$url", backend="$url")
@app.task
def sq(x):
    return x * x
P
  cat > "$tmp/cel_bench.py" <<'P'
import sys, time
from celtasks import sq
n = int(sys.argv[1])
sq.delay(1).get(timeout=60)
t0 = time.time()
rs = [sq.delay(i) for i in range(n)]
for i, r in enumerate(rs):
    assert r.get(timeout=600) == i * i
dt = time.time() - t0
print("Celery (prefork 2) tiny tasks: %6d in %6.2f s = %8.0f tasks/s" % (n, dt, n / dt))
open("celery.res", "w").write("%.0f\n" % (n / dt))
P
  (cd "$tmp" && exec "$py" -m celery -A celtasks worker -c 2 -P prefork -l warning >"$tmp/celery.log" 2>&1) & pids+=($!)
  (cd "$tmp" && "$py" cel_bench.py "$n")
else
  echo "Celery: python3-celery not installed (apt-get install python3-celery); not measured"
fi

# machine-readable lines for scripts/bench/run.sh: Python is Celery, the peer RQ; the map
# figure's peer is the local Pool(2) on the same items
read -r l_rate l_map l_local < "$tmp/luamp.res"
cel=$(cat "$tmp/celery.res" 2>/dev/null || echo -)
rq=$(cat "$tmp/rq.res" 2>/dev/null || echo -)
echo "RESULT name=broker.tiny luamp=$l_rate python=$cel peer=$rq unit=tasks/s"
echo "RESULT name=broker.map1m luamp=$l_map python=- peer=$l_local unit=s"
