#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan+UBSan) into ${LUAMP_FUZZ_BUILD:-build-fuzz} and
# runs one: scripts/fuzz.sh codec [seconds]. The seed corpus fuzz/corpus_<name>/ is copied
# to a scratch corpus so the tree is not touched; crashes land in build-fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: scripts/fuzz.sh NAME [SECONDS]}
secs=${2:-60}
build=${LUAMP_FUZZ_BUILD:-build-fuzz}
command -v clang >/dev/null || scripts/apt-install.sh clang
CC=clang cmake -S . -B "$build" -DLUAMP_SANITIZE=ON -DLUAMP_FUZZ=ON >/dev/null
cmake --build "$build" -j2 --target "fuzz_$name"
work="$build/corpus_$name"
mkdir -p "$work" "$build/artifacts"
[[ -d fuzz/corpus_$name ]] && cp -n fuzz/corpus_"$name"/* "$work"/ 2>/dev/null || true
exec "$build/fuzz_$name" -max_total_time="$secs" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix="$build/artifacts/" -print_final_stats=1 "$work"
