#!/usr/bin/env bash
# scripts/apt-install.sh PACKAGE...: installs those of the named Debian packages that are
# not installed yet (apt-get, as root), quietly; nothing when all are there. Exits with
# apt-get's status, so a caller decides whether a failure is fatal (scripts/build.sh) or
# only leaves a benchmark's column empty (scripts/bench/run.sh, broker.sh).
set -uo pipefail
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
echo "installing: ${missing[*]}"
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
