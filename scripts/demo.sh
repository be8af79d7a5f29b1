#!/usr/bin/env bash
# The demo: installs what is missing, builds, then maps a fragmented 4 GiB
# image behind a slow nbdkit upstream (5 ms per block-status call), first
# directly and then through bscache, and prints the speed-up and hit rate.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
scripts/build.sh >/dev/null
bscache=$PWD/build/bscache

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tests/integration/make_extents.sh $((4 << 30)) 2500 42 >"$work/extents"
upstream="nbdkit --filter=delay --filter=extentlist null size=4G extentlist=$work/extents delay-extents=5ms"

now() { date +%s.%N; }
echo "upstream: $upstream"
echo
echo "1. qemu-img map directly against the slow upstream..."
t0=$(now)
$upstream --run 'qemu-img map --output=json "$uri"' >"$work/direct.map"
t1=$(now)
direct=$(echo "$t1 - $t0" | bc -l)

echo "2. the same map through bscache (upstream started by bscache itself)..."
t0=$(now)
"$bscache" --log-level warn --stats-file "$work/stats.json" --upstream-command "$upstream" \
  --run 'qemu-img map --output=json "$uri"' >"$work/bscache.map"
t1=$(now)
cached=$(echo "$t1 - $t0" | bc -l)

cmp -s "$work/direct.map" "$work/bscache.map" || { echo "ERROR: maps differ" >&2; exit 1; }
extents=$(wc -l <"$work/direct.map")
read -r requests upstream_calls hit_rate < <(jq -r \
  '"\(.client.requests.block_status) \(.upstream.requests.block_status) \(.block_status.hit_rate)"' "$work/stats.json")
echo
printf 'extents in the map:            %d (identical output both ways)\n' "$extents"
printf 'direct:                        %6.2f s, %d block-status round trips\n' "$direct" "$requests"
printf 'through bscache:               %6.2f s, %d upstream block-status calls\n' "$cached" "$upstream_calls"
printf 'speed-up:                      %6.1fx\n' "$(echo "$direct / $cached" | bc -l)"
printf 'block-status hit rate:         %6.1f%%\n' "$(echo "$hit_rate * 100" | bc -l)"
