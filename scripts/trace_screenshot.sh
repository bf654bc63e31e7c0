#!/bin/sh
# Renders a trace of a seed example to a PNG with headless Chromium (Debian's chromium
# package) and docs/trace-view.html:  scripts/trace_screenshot.sh [example.lua [out.png]]
# Run from the root of a clone after scripts/build.sh.
set -eu
example=${1:-scripts/examples/pool_long_tasks.lua}
out=${2:-docs/trace-pool_long_tasks.png}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
LUAMP_TRACE="$dir/run.json" build/luamp "$example" 2 > /dev/null
{ printf 'window.TRACE = '; cat "$dir/run.json"; printf ';\n'; } > "$dir/trace-data.js"
cp docs/trace-view.html "$dir/index.html"
chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run \
  --user-data-dir="$dir/profile" --hide-scrollbars --window-size=1140,330 \
  --screenshot="$dir/shot.png" "file://$dir/index.html" > /dev/null 2>&1
cp "$dir/shot.png" "$out"
echo "$out"
