#!/usr/bin/env bash
# Several clients at once share one upstream connection and one cache; a
# request held upstream for one client does not block the others. Nothing
# here depends on timing: the sharing is counted in upstream calls, and the
# held request is released only after the other client has finished.
source "$(dirname "$0")/lib.sh"
here=$(dirname "$0")

# 1. Six concurrent maps (four whole, two halves) equal direct's, and share
#    the fetches: 64 MiB windows over 4 GiB make one scan cost 64 upstream
#    calls, so six unshared scans would cost 4 x 64 + 2 x 32 = 320.
window=$((64 << 20))
windows=$(((4 << 30) / window))
"$here/make_extents.sh" $((4 << 30)) 2000 5 >"$T/extents"
start_nbdkit ref --filter=extentlist null size=4G extentlist="$T/extents"
start_nbdkit up --filter=stats --filter=delay --filter=extentlist null size=4G extentlist="$T/extents" \
  delay-extents=5ms statsfile="$T/upstream.stats"
start_bscache bs --upstream "$(uri up)" --fetch-window $window --stats-file "$T/bscache.json"
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

# A seventh client, after the others, is answered from their fetches alone.
rm -f "$T/bscache.json"
kill -USR1 "$(cat "$T/bs.pid")"
wait_for_file "$T/bscache.json"
calls_before=$(jq '.upstream.requests.block_status' "$T/bscache.json")
qemu-img map --output=json "$(uri bs)" | cmp -s - "$T/direct.map" || fail "seventh map differs"
stop_server bs
stop_server up
calls_after=$(jq '.upstream.requests.block_status' "$T/bscache.json")
upstream_calls=$(stats_count "$T/upstream.stats" extents)
client_calls=$(jq '.client.requests.block_status' "$T/bscache.json")
echo "client block-status requests: $client_calls; upstream calls: $upstream_calls for 6 concurrent scans" \
  "($windows windows each), $((calls_after - calls_before)) for the seventh"
[[ $upstream_calls == "$calls_after" ]] || fail "bscache's upstream count disagrees with nbdkit's stats filter"
((upstream_calls <= windows * 3 / 2)) || fail "the concurrent scans did not share fetches: $upstream_calls upstream calls"
((calls_after == calls_before)) || fail "the seventh scan went upstream $((calls_after - calls_before)) times"
pass "6 concurrent scans cost $upstream_calls upstream calls; a 7th cost none"

# 2. A WRITE_ZEROES held upstream on one connection does not hold up block
#    status on another: the map must finish while the zero is still held (it
#    is released only afterwards, so a map that waited for it would never end).
start_nbdkit held python "$here/held_zero_plugin.py" size=$((64 << 20)) \
  started="$T/zero.started" release="$T/zero.release"
start_bscache bs2 --upstream "$(uri held)"
qemu-io -f raw -c 'write -z 32M 64k' "$(uri bs2)" >"$T/zero.out" 2>&1 & zeroer=$!
PIDS+=("$zeroer")
wait_for_file "$T/zero.started"  # the zero is in flight upstream, and stays there
timeout 60 qemu-img map -f raw --output=json "$(uri bs2)" >"$T/held.map" \
  || fail "block status on one connection waited for a zero held on another"
kill -0 "$zeroer" 2>/dev/null || fail "the held zero finished before its release: test is not testing"
jq -e 'length == 1 and .[0].data == true' "$T/held.map" >/dev/null || fail "map during the held zero: $(cat "$T/held.map")"
echo released >"$T/zero.release"
wait "$zeroer" || fail "the zero failed after its release: $(cat "$T/zero.out")"
pass "block status answered while another client's zero was held upstream"
