#!/usr/bin/env bash
# A qemu-img map of a 4 GiB image with 2,500 extents through bscache costs a
# handful of upstream block-status calls, and its output equals direct.
source "$(dirname "$0")/lib.sh"
here=$(dirname "$0")

"$here/make_extents.sh" $((4 << 30)) 2500 42 >"$T/extents"
# Reference upstream for the direct map; counted upstream for the proxy.
start_nbdkit ref --filter=extentlist null size=4G extentlist="$T/extents"
start_nbdkit up --filter=stats --filter=extentlist null size=4G extentlist="$T/extents" \
  statsfile="$T/upstream.stats"
start_bscache bs --upstream "$(uri up)" --stats-file "$T/bscache.json"

qemu-img map --output=json "$(uri ref)" >"$T/direct.map"
qemu-img map --output=json "$(uri bs)" >"$T/proxy.map"
diff -u "$T/direct.map" "$T/proxy.map" >/dev/null || fail "qemu-img map through bscache differs from direct"
extents=$(wc -l <"$T/direct.map")
((extents >= 2000)) || fail "expected a fragmented map, got $extents extents"
pass "qemu-img map identical ($extents extents)"

# A second scan is answered entirely from the cache.
qemu-img map --output=json "$(uri bs)" | cmp -s - "$T/direct.map" || fail "second map differs"

stop_server bs
stop_server up
upstream_calls=$(stats_count "$T/upstream.stats" extents)
client_calls=$(jq '.client.requests.block_status' "$T/bscache.json")
hits=$(jq '.block_status.hits' "$T/bscache.json")
misses=$(jq '.block_status.misses' "$T/bscache.json")
echo "client block-status requests: $client_calls, upstream calls: $upstream_calls, hits: $hits, misses: $misses"
((client_calls >= 2 * extents / 2)) || fail "qemu-img sent fewer requests than expected ($client_calls)"
((upstream_calls <= 8)) || fail "too many upstream block-status calls: $upstream_calls"
((hits + misses == client_calls)) || fail "hits + misses ($hits + $misses) != client requests ($client_calls)"
[[ $(jq '.upstream.requests.block_status' "$T/bscache.json") == "$upstream_calls" ]] \
  || fail "bscache's upstream count disagrees with nbdkit's stats filter"
pass "$client_calls client requests cost $upstream_calls upstream calls"
