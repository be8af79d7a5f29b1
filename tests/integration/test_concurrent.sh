#!/usr/bin/env bash
# Several clients at once share one upstream connection and one cache; a slow
# request from one does not block the others.
source "$(dirname "$0")/lib.sh"
here=$(dirname "$0")

"$here/make_extents.sh" $((4 << 30)) 2000 5 >"$T/extents"
start_nbdkit ref --filter=extentlist null size=4G extentlist="$T/extents"
start_nbdkit up --filter=delay --filter=extentlist null size=4G extentlist="$T/extents" delay-extents=5ms
start_bscache bs --upstream "$(uri up)"
qemu-img map --output=json "$(uri ref)" >"$T/direct.map"
half=$((2 << 30))
qemu-img map --output=json --max-length=$half "$(uri ref)" >"$T/direct-lo.map"
qemu-img map --output=json --start-offset=$half "$(uri ref)" >"$T/direct-hi.map"
pids=()
for i in 1 2 3 4; do
  qemu-img map --output=json "$(uri bs)" >"$T/map$i" & pids+=($!)
done
qemu-img map --output=json --max-length=$half "$(uri bs)" >"$T/lo.map" & pids+=($!)
qemu-img map --output=json --start-offset=$half "$(uri bs)" >"$T/hi.map" & pids+=($!)
for p in "${pids[@]}"; do wait "$p" || fail "a concurrent client failed"; done
for i in 1 2 3 4; do cmp -s "$T/map$i" "$T/direct.map" || fail "concurrent map $i differs"; done
cmp -s "$T/lo.map" "$T/direct-lo.map" || fail "lower half differs"
cmp -s "$T/hi.map" "$T/direct-hi.map" || fail "upper half differs"
pass "6 concurrent qemu-img map clients, identical output"

# A slow request on one connection does not hold up block status on another
# (here a 3 s WRITE_ZEROES, which also forces the racing fetches' fallback).
start_nbdkit slow --filter=delay memory 64M delay-zero=3
start_bscache bs2 --upstream "$(uri slow)"
qemu-io -f raw -c 'write -z 32M 64k' "$(uri bs2)" >/dev/null & slow=$!
start=$(date +%s%N)
qemu-img map -f raw --output=json "$(uri bs2)" >/dev/null
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
kill -0 "$slow" 2>/dev/null || fail "the slow read finished before the map: test is not testing"
wait "$slow"
echo "map while a 3 s zero was in flight: ${elapsed_ms} ms"
pass "slow request on one client does not block another"
