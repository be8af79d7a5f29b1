#!/usr/bin/env bash
# Issue 15: --policy ttl=D bounds staleness from when upstream was asked, not
# from when its reply arrived. An outside writer fills a range directly
# upstream; every query through bscache that starts more than D after that
# write completed must see data.
source "$(dirname "$0")/lib.sh"
py=/usr/bin/python3
here=$(dirname "$0")
ttl=1

# A slow upstream: each block-status reply describes the disk as it was when
# asked and arrives 3 s later (3 x the TTL). A fetch sent before the write
# comes back stale; it must answer only the queries that were already
# waiting on it, and must neither be cached nor joined by later queries.
start_nbdkit slow python "$here/stale_extents_plugin.py" size=$((64 << 20)) delay=3
start_bscache bs --upstream "$(uri slow)" --policy ttl=${ttl}s
$py "$here/ttl_staleness.py" "$(uri bs)" "$(uri slow)" $ttl $((4 << 20)) 4.5 \
  || fail "a slow reply kept a stale hole alive past the TTL"
pass "slow upstream: no stale answer more than ${ttl}s after an outside write"

# A fast upstream: the hole is cached at once and must expire D after the
# fetch was sent.
start_nbdkit fast python "$here/stale_extents_plugin.py" size=$((64 << 20)) delay=0
start_bscache bs2 --upstream "$(uri fast)" --policy ttl=${ttl}s
$py "$here/ttl_staleness.py" "$(uri bs2)" "$(uri fast)" $ttl $((4 << 20)) 2.5 \
  || fail "a cached hole outlived the TTL"
pass "fast upstream: cached hole expired within ${ttl}s of the outside write"
