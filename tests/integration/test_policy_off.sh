#!/usr/bin/env bash
# --policy off caches nothing: every client block-status request goes upstream
# unchanged, REQ_ONE included.
source "$(dirname "$0")/lib.sh"
here=$(dirname "$0")

"$here/make_extents.sh" $((256 << 20)) 300 7 >"$T/extents"
start_nbdkit up --filter=stats --filter=extentlist null size=256M extentlist="$T/extents" \
  statsfile="$T/upstream.stats"
start_bscache bs --upstream "$(uri up)" --policy off --stats-file "$T/bscache.json"
qemu-img map --output=json "$(uri bs)" >/dev/null
qemu-img map --output=json "$(uri bs)" >/dev/null
stop_server bs
stop_server up
upstream_calls=$(stats_count "$T/upstream.stats" extents)
client_calls=$(jq '.client.requests.block_status' "$T/bscache.json")
echo "client block-status requests: $client_calls, upstream calls: $upstream_calls"
((client_calls > 100)) || fail "expected many client requests, got $client_calls"
((upstream_calls == client_calls)) || fail "policy off: $client_calls client requests but $upstream_calls upstream"
[[ $(jq -r '.policy' "$T/bscache.json") == off ]] || fail "stats file does not say policy off"
pass "policy off forwards every request ($client_calls)"
