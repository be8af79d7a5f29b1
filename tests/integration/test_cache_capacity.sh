#!/usr/bin/env bash
# Issue 16: a cache that never costs more than no cache. Whatever the disk and
# the cache limit, bscache sends at most as many block-status calls upstream
# as its clients sent it (counted by bscache and by nbdkit's stats filter),
# and the map is the one direct access gives.
source "$(dirname "$0")/lib.sh"
here=$(dirname "$0")
py=/usr/bin/python3

# check NAME REFERENCE_UPSTREAM_CALLS: the call counts of bscache NAME (already
# stopped) against upstream NAME-up; REFERENCE is what nbdkit counted before
# bscache's client ran (a direct reference run on the same upstream).
check_calls() {
  local name=$1 before=$2 upstream client sent
  upstream=$(($(stats_count "$T/$name-up.stats" extents) - before))
  client=$(jq '.client.requests.block_status' "$T/$name.json")
  sent=$(jq '.upstream.requests.block_status' "$T/$name.json")
  echo "$name: $client client block-status requests, $upstream upstream calls (bscache counted $sent)," \
    "$(jq -c '.cache | {extents, max_extents, evictions, bypassed}' "$T/$name.json")"
  ((sent == upstream)) || fail "$name: bscache counted $sent upstream calls, nbdkit $upstream"
  ((upstream <= client)) || fail "$name: $upstream upstream calls for $client client requests: worse than no cache"
  [[ $(jq '.block_status.upstream_calls_saved' "$T/$name.json") == $((client - upstream)) ]] \
    || fail "$name: upstream_calls_saved is not client minus upstream requests"
}
dense_extents() {  # SIZE: alternating 4 KiB data / hole
  awk -v n=$(($1 / 4096)) 'BEGIN { for (i = 0; i < n; i++) printf "%.0f 4096 %s\n", i * 4096, (i % 2) ? "hole,zero" : "" }'
}

# 8 GiB, 5,000 extents, a 16-extent cache: windows sized to what the cache
# holds, so eviction never throws one away before it is used, and no more
# upstream calls than client calls.
"$here/make_extents.sh" $((8 << 30)) 5000 42 >"$T/sparse.ext"
start_nbdkit sparse --filter=extentlist null size=8G extentlist="$T/sparse.ext"
start_nbdkit tiny-up --filter=stats --filter=extentlist null size=8G extentlist="$T/sparse.ext" \
  statsfile="$T/tiny-up.stats"
start_bscache tiny --upstream "$(uri tiny-up)" --cache-max-extents 16 --stats-file "$T/tiny.json"
qemu-img map --output=json "$(uri sparse)" >"$T/sparse.map"
timeout 120 qemu-img map --output=json "$(uri tiny)" >"$T/tiny.map" || fail "qemu-img map through a 16-extent cache"
cmp -s "$T/sparse.map" "$T/tiny.map" || fail "map through a 16-extent cache differs from direct"
stop_server tiny
stop_server tiny-up
check_calls tiny 0
(($(jq '.cache.extents' "$T/tiny.json") <= 16)) || fail "more extents cached than --cache-max-extents"
pass "8 GiB, 5,000 extents, 16-extent cache: map identical, no more upstream calls than client calls"

# Dense: 4 KiB extents. With a 16-extent cache (against direct qemu-img map) ...
dense_extents $((64 << 20)) >"$T/dense64.ext"
start_nbdkit dense64 --filter=extentlist null size=64M extentlist="$T/dense64.ext"
start_nbdkit small-up --filter=stats --filter=extentlist null size=64M extentlist="$T/dense64.ext" \
  statsfile="$T/small-up.stats"
start_bscache small --upstream "$(uri small-up)" --cache-max-extents 16 --stats-file "$T/small.json"
qemu-img map --output=json "$(uri dense64)" >"$T/dense64.map"
timeout 120 qemu-img map --output=json "$(uri small)" >"$T/small.map" || fail "qemu-img map, dense, 16 extents"
cmp -s "$T/dense64.map" "$T/small.map" || fail "dense map through a 16-extent cache differs from direct"
stop_server small
stop_server small-up
check_calls small 0
pass "64 MiB of 4 KiB extents, 16-extent cache: map identical, no more upstream calls than client calls"

# ... and with the default limit (from --cache-max-memory 256M), which must
# hold a whole 4 GiB disk of 4 KiB extents (1,048,576). A 1 GiB disk keeps the
# test short (256 MiB under a sanitizer, where each of its 262,144 hits costs
# several times more); a direct qemu-img map of it would take minutes (upstream
# recomputes the rest of the disk for every REQ_ONE call), so the reference is
# nbdinfo's map of the same upstream.
dense_size=$((1 << 30))
[[ ${BSCACHE_SANITIZER:-none} != none ]] && dense_size=$((256 << 20))
dense_extents $dense_size >"$T/dense1g.ext"
start_nbdkit dflt-up --filter=stats --filter=extentlist null size=$dense_size extentlist="$T/dense1g.ext" \
  statsfile="$T/dflt-up.stats"
nbdinfo --map --json "$(uri dflt-up)" >"$T/dense1g.ref"
start_bscache dflt --upstream "$(uri dflt-up)" --stats-file "$T/dflt.json"
timeout 150 qemu-img map --output=json "$(uri dflt)" >"$T/dflt.map" || fail "qemu-img map, dense, default limit"
$py "$here/same_map.py" "$T/dflt.map" "$T/dense1g.ref" || fail "dense map with the default limit differs"
# A cold non-REQ_ONE map goes upstream as one call per client call.
start_bscache cold --upstream "$(uri dflt-up)" --stats-file "$T/cold.json"
nbdinfo --map --json "$(uri cold)" >"$T/cold.json.map"
cmp -s "$T/dense1g.ref" "$T/cold.json.map" || fail "nbdinfo --map through bscache differs from direct"
stop_server cold
stop_server dflt
stop_server dflt-up
(($(jq '.cache.max_extents' "$T/dflt.json") >= 1048576)) || fail "the default limit cannot hold a dense 4 GiB disk"
(($(jq '.cache.evictions' "$T/dflt.json") == 0)) || fail "the default limit evicted on a dense disk"
dflt_calls=$(jq '.upstream.requests.block_status' "$T/dflt.json")
cold_calls=$(jq '.upstream.requests.block_status' "$T/cold.json")
((dflt_calls + cold_calls + 1 == $(stats_count "$T/dflt-up.stats" extents))) || fail "upstream call counts disagree"
((dflt_calls <= dense_size / (16 << 20))) || fail "the default limit needed $dflt_calls upstream calls for a dense map"
(($(jq '.client.requests.block_status' "$T/dflt.json") >= dense_size / 4096)) || fail "qemu-img sent fewer requests than extents"
((cold_calls <= $(jq '.client.requests.block_status' "$T/cold.json"))) || fail "nbdinfo --map: more upstream calls"
pass "$((dense_size >> 20)) MiB of 4 KiB extents, default limit: $dflt_calls upstream calls, no eviction; nbdinfo --map: $cold_calls"

# A cache too small for any window forwards requests as they came, says so
# once, and counts it.
start_nbdkit byp-up --filter=stats --filter=extentlist null size=8G extentlist="$T/sparse.ext" \
  statsfile="$T/byp-up.stats"
start_bscache byp --upstream "$(uri byp-up)" --cache-max-extents 2 --stats-file "$T/byp.json" --metrics 127.0.0.1:0
endpoint=$(grep -o 'metrics on http://[^ ]*' "$T/byp.log" | head -1 | sed 's/metrics on //')
qemu-img map --output=json "$(uri byp)" >"$T/byp.map"
cmp -s "$T/sparse.map" "$T/byp.map" || fail "map through a bypassing cache differs from direct"
curl -sf "$endpoint" | grep -q '^bscache_cache_bypassed_total [1-9]' || fail "bscache_cache_bypassed_total not counted"
stop_server byp
stop_server byp-up
check_calls byp 0
bypassed=$(jq '.cache.bypassed' "$T/byp.json")
((bypassed == $(jq '.block_status.misses' "$T/byp.json") && bypassed > 0)) || fail "cache.bypassed ($bypassed) != misses"
(($(grep -c 'forwarded upstream as they come' "$T/byp.log") == 1)) || fail "the bypass is not logged exactly once"
pass "a 2-extent cache forwards every miss unchanged ($bypassed), logged once"
