#!/usr/bin/env bash
# Randomized differential test: two proxy connections race writes, zeroes,
# trims and block-status queries; every answer must describe upstream's state
# before or after the batch it raced (no flag upstream lacked, ZERO only where
# the data reads as zeroes), and data must match. Seeded and reproducible:
# SEED=n OPS=n to replay.
source "$(dirname "$0")/lib.sh"

seeds=${SEED:-"1 2 3"}
ops=${OPS:-1500}
# Small fetch windows and a tiny cache make every path run: misses, window
# edges, prefetch, eviction.
start_nbdkit up memory 16M
qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'write -P 0x6b 4M 2M' -c 'write -P 0x7c 12M 64k' "$(uri up)" >/dev/null
start_bscache bs --upstream "$(uri up)" --fetch-window $((1 << 20)) --cache-max-extents 64
for seed in $seeds; do
  "$TEST_TOOLS/differential" "$(uri bs)" "$(uri up)" "$seed" "$ops" || fail "differential test, seed $seed"
done
pass "differential test, seeds $seeds"

# And with the default (huge) windows and a slow write path, so fetches and
# writes overlap in time.
start_nbdkit slow --filter=delay memory 16M delay-write=5ms delay-zero=5ms delay-trim=5ms
start_bscache bs2 --upstream "$(uri slow)"
"$TEST_TOOLS/differential" "$(uri bs2)" "$(uri slow)" 99 400 || fail "differential test against slow writes"
pass "differential test against slow writes"

# And over an export that is all data, with slower mutations: a query that
# races a write here may only ever see data, so an answer invented while the
# write is in flight (which the re-ask after it cannot see) fails.
start_nbdkit full --filter=delay memory 16M delay-write=20ms delay-zero=20ms delay-trim=20ms
qemu-io -f raw -c 'write -P 0x11 0 16M' "$(uri full)" >/dev/null
start_bscache bs3 --upstream "$(uri full)"
"$TEST_TOOLS/differential" "$(uri bs3)" "$(uri full)" 7 300 || fail "differential test over an all-data export"
pass "differential test over an all-data export with slow mutations"

# Two exports of one upstream through one bscache, raced at the same time,
# with one small cache budget for both: a mutation of one export must never
# change what the other answers, and eviction across exports must keep every
# answer true.
mkdir "$T/dir"
truncate -s 16M "$T/dir/x.img" "$T/dir/y.img"
start_nbdkit updir file dir="$T/dir"
start_bscache bsdir --upstream "$(uri updir)" --fetch-window $((1 << 20)) --cache-max-extents 64
export_uri() { echo "nbd+unix:///$2?socket=$T/$1.sock"; }
"$TEST_TOOLS/differential" "$(export_uri bsdir x.img)" "$(export_uri updir x.img)" 7 800 &
racer_x=$!
"$TEST_TOOLS/differential" "$(export_uri bsdir y.img)" "$(export_uri updir y.img)" 8 800 &
racer_y=$!
wait "$racer_x" || fail "differential test on export x.img beside y.img"
wait "$racer_y" || fail "differential test on export y.img beside x.img"
pass "differential test on two exports at once, one shared 64-extent cache budget"
