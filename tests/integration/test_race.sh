#!/usr/bin/env bash
# The race nbdkit's cacheextents loses: a block-status fetch that runs while a
# write is in flight must not be cached over the written range.
source "$(dirname "$0")/lib.sh"
py=/usr/bin/python3
here=$(dirname "$0")

start_nbdkit up --filter=delay memory 64M delay-write=1500ms
start_bscache bs --upstream "$(uri up)"
$py "$here/race.py" slow-write "$(uri bs)" $((8 << 20)) 65536 1.5 || fail "bscache served a stale hole after a write"
pass "no stale state after a write racing a fetch"

# A fetch already in flight (slow extents) when the write starts and ends.
start_nbdkit up2 --filter=delay memory 64M delay-extents=1500ms
start_bscache bs2 --upstream "$(uri up2)"
$py "$here/race.py" slow-fetch "$(uri bs2)" $((1 << 20)) 65536 0.3 || fail "fetch in flight across a write"
pass "no stale state from a fetch in flight across a write"

# The stale-late interleaving: upstream computes a block-status reply, a
# write arrives and completes, and only then the (now stale) reply arrives.
start_nbdkit late python "$here/stale_extents_plugin.py" size=$((64 << 20)) delay=1.5
start_bscache bs3 --upstream "$(uri late)"
$py "$here/race.py" slow-fetch "$(uri bs3)" $((4 << 20)) 65536 0.5 || fail "a stale reply arriving after a write was cached"
pass "no stale state from a reply computed before a write and delivered after it"
