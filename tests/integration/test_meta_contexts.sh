#!/usr/bin/env bash
# Dirty bitmaps and allocation depth, cached (#25): qemu-nbd 7.2 and qemu-nbd
# 10 with -A and -B bm0 over a qcow2 with a backing file and a bitmap dirtied
# before export. Through bscache, every map of every context (qemu-img map
# with x-dirty-bitmap=, nbdinfo --map=CONTEXT) equals direct access's, cold
# and warm; a REQ_ONE walk of the bitmap costs at most one upstream call per
# window; writes, zeroes and trims through bscache show in the next map;
# writes racing fetches leave nothing stale (delay_relay.py holds a write, or
# a block-status reply); and the randomized differential test runs over each
# context.
source "$(dirname "$0")/lib.sh"
py=/usr/bin/python3
here=$(dirname "$0")
root=$(cd "$here/../.." && pwd)
bitmap=qemu:dirty-bitmap:bm0
depth=qemu:allocation-depth

# make_image PATH: 64 MiB qcow2 over a backing file with data at 0 and 8 MiB;
# bm0 added, then 40 dirty extents (39 writes and a zero) written into it.
make_image() {
  qemu-img create -q -f qcow2 "$1.base" 64M
  qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -P 2 8M 512k' "$1.base" >/dev/null
  qemu-img create -q -f qcow2 -b "$1.base" -F qcow2 "$1"
  qemu-img bitmap --add "$1" bm0
  local cmds=() i
  for i in $(seq 0 38); do cmds+=(-c "write -P 3 $((i * 1536 + 64))k 64k"); done
  qemu-io -f qcow2 "${cmds[@]}" -c 'write -z 62M 128k' "$1" >/dev/null
}

# start_qemu_nbd NAME QEMU_BIN_DIR IMAGE: writable, 16 clients (each bscache takes 4), both contexts.
start_qemu_nbd() {
  rm -f "$T/$1.sock" "$T/$1.pid"
  "$2/qemu-nbd" -t -e 16 -f qcow2 -A -B bm0 -k "$T/$1.sock" --pid-file="$T/$1.pid" "$3" >"$T/$1.log" 2>&1 &
  PIDS+=($!)
  wait_for_file "$T/$1.pid"
}

# start_relay NAME UPSTREAM_NAME ARGS...: delay_relay.py on $T/NAME.sock.
start_relay() {
  local name=$1 up=$2; shift 2
  rm -f "$T/$name.sock" "$T/$name.pid"
  $py "$here/delay_relay.py" "$T/$name.sock" "$T/$up.sock" --pidfile "$T/$name.pid" "$@" >"$T/$name.log" 2>&1 &
  PIDS+=($!)
  wait_for_file "$T/$name.pid"
}

qemu_map() {  # BIN_DIR NAME CONTEXT
  "$1/qemu-img" map --output=json --image-opts "driver=nbd,server.type=unix,server.path=$T/$2.sock,x-dirty-bitmap=$3"
}

# same_maps LABEL BIN_DIR PROXY DIRECT: every map of every context agrees.
same_maps() {
  local label=$1 bin=$2 proxy=$3 direct=$4 ctx
  for ctx in $bitmap $depth base:allocation; do
    diff <(nbdinfo --map="$ctx" "$(uri "$direct")") <(nbdinfo --map="$ctx" "$(uri "$proxy")") >&2 \
      || fail "$label: nbdinfo --map=$ctx through bscache differs from direct"
  done
  for ctx in $bitmap $depth; do
    diff <(qemu_map "$bin" "$direct" "$ctx") <(qemu_map "$bin" "$proxy" "$ctx") >&2 \
      || fail "$label: qemu-img map with x-dirty-bitmap=$ctx through bscache differs from direct"
  done
}

qemus=("/usr/bin")
[[ -x $root/.cache/qemu10/bin/qemu-nbd ]] && qemus+=("$(qemu10_bin)")
for bin in "${qemus[@]}"; do
  version=$("$bin/qemu-nbd" --version | head -1 | grep -oE ' [0-9]+\.[0-9.]+' | tr -d ' ')
  tag=$(echo "$version" | tr -dc '0-9')
  make_image "$T/disk$tag.qcow2"
  start_qemu_nbd "up$tag" "$bin" "$T/disk$tag.qcow2"
  [[ $(nbdinfo --list "$(uri "up$tag")" | grep -c 'qemu:') == 2 ]] || fail "qemu-nbd $version: expected both contexts"

  # Maps, cold and warm, with small windows (8 of them) and with the default.
  # (An export idle for --export-idle-timeout is closed, its cache with it:
  # an hour, so "warm" stays warm on a slow machine.)
  start_bscache "bs$tag" --upstream "$(uri "up$tag")" --fetch-window $((8 << 20)) --export-idle-timeout 1h
  same_maps "qemu-nbd $version, cold" "$bin" "bs$tag" "up$tag"
  same_maps "qemu-nbd $version, warm" "$bin" "bs$tag" "up$tag"
  stop_server "bs$tag"
  start_bscache "big$tag" --upstream "$(uri "up$tag")"
  same_maps "qemu-nbd $version, one window" "$bin" "big$tag" "up$tag"
  stop_server "big$tag"
  pass "qemu-nbd $version: every map of the bitmap, the depth and base:allocation equals direct, cold and warm"

  # qemu's REQ_ONE walk of the bitmap: at most one upstream call per window.
  start_bscache "walk$tag" --upstream "$(uri "up$tag")" --fetch-window $((8 << 20)) --stats-file "$T/walk$tag.json"
  qemu_map "$bin" "walk$tag" "$bitmap" >"$T/walk$tag.map"
  stop_server "walk$tag"
  queries=$(jq '.block_status.hits + .block_status.misses' "$T/walk$tag.json")
  calls=$(jq '.upstream.requests.block_status' "$T/walk$tag.json")
  jq -e --arg c "$bitmap" '.block_status.contexts[$c] | .upstream_calls <= 8 and .hits > 0 and .hit_rate > 0.9' \
    "$T/walk$tag.json" >/dev/null || fail "qemu-nbd $version: bitmap counters: $(jq -c .block_status "$T/walk$tag.json")"
  ((queries >= 80 && calls <= 8)) || fail "qemu-nbd $version: $queries REQ_ONE queries cost $calls upstream calls (8 windows)"
  pass "qemu-nbd $version: a REQ_ONE walk of $queries queries over 8 windows cost $calls upstream calls"

  # Writes, a zero and a trim through bscache once the maps cached every
  # context: the next maps show them, as upstream does.
  start_bscache "wr$tag" --upstream "$(uri "up$tag")" --fetch-window $((8 << 20)) --export-idle-timeout 1h \
    --stats-file "$T/wr$tag.json"
  same_maps "qemu-nbd $version, before writes" "$bin" "wr$tag" "up$tag"
  qemu-io -f raw -c 'write -P 9 30M 4k' -c 'write -z 40M 64k' -c 'discard 50M 64k' -c 'write -P 9 63M 512' \
    "$(uri "wr$tag")" >/dev/null || fail "qemu-nbd $version: writes through bscache"
  [[ $(nbdinfo --map="$bitmap" "$(uri "wr$tag")" | awk '$1 == 31457280 { print $3 }') == 1 ]] \
    || fail "qemu-nbd $version: the range written through bscache is not dirty through bscache"
  same_maps "qemu-nbd $version, after writes" "$bin" "wr$tag" "up$tag"
  stop_server "wr$tag"
  grep -q 'export "" closed' "$T/wr$tag.log" && fail "qemu-nbd $version: the export closed: the maps were not warm"
  pass "qemu-nbd $version: writes, zeroes and trims through bscache show in every context's next map"

  # Every counter per context, in the stats file and in Prometheus.
  start_bscache "prom$tag" --upstream "$(uri "up$tag")" --metrics 127.0.0.1:0
  endpoint=$(grep -o 'metrics on http://[^ ]*' "$T/prom$tag.log" | head -1 | sed 's/metrics on //')
  nbdinfo --map="$depth" "$(uri "prom$tag")" >/dev/null
  curl -sf "$endpoint" >"$T/prom$tag.prom" || fail "GET /metrics"
  grep -q "^bscache_block_status_context_upstream_calls_total{context=\"$depth\"} 1\$" "$T/prom$tag.prom" \
    || fail "qemu-nbd $version: no upstream call counted for $depth: $(grep context "$T/prom$tag.prom")"
  grep -q "^bscache_block_status_context_hits_total{export=\"\",context=\"$depth\"} " "$T/prom$tag.prom" \
    || fail "qemu-nbd $version: no per-export context series"
  pass "qemu-nbd $version: per-context counters in /metrics"
  stop_server "prom$tag"
done

# The races, against qemu-nbd 7.2 through the relay (a clean, unallocated
# range: 33 MiB is neither written nor dirty).
make_image "$T/race.qcow2"
start_qemu_nbd racy /usr/bin "$T/race.qcow2"
start_relay heldwrite racy --delay-write 1.5
start_bscache bsw --upstream "$(uri heldwrite)" --export-idle-timeout 1h
$py "$here/race_contexts.py" slow-write "$(uri bsw)" "$(uri racy)" $((33 << 20)) 65536 1.5 "$bitmap" "$depth" \
  || fail "a write held upstream while bscache fetched left a stale state"
pass "no stale bitmap or depth after a write held upstream while a fetch ran"
stop_server bsw
start_relay heldreply racy --hold-block-status 1.5
start_bscache bsf --upstream "$(uri heldreply)" --export-idle-timeout 1h
$py "$here/race_contexts.py" slow-fetch "$(uri bsf)" "$(uri racy)" $((35 << 20)) 65536 0.3 "$bitmap" "$depth" \
  || fail "a reply computed before a write and delivered after it was cached"
pass "no stale bitmap or depth from a reply computed before a write and delivered after it"
stop_server bsf

# The randomized differential test over each context (small windows, a tiny
# cache), and over base:allocation beside them, one bscache for all.
make_image "$T/diff.qcow2"
start_qemu_nbd diffup /usr/bin "$T/diff.qcow2"
start_bscache bsd --upstream "$(uri diffup)" --fetch-window $((1 << 20)) --cache-max-extents 64 --export-idle-timeout 1h
for ctx in "$bitmap" "$depth" base:allocation; do
  "$TEST_TOOLS/differential" "$(uri bsd)" "$(uri diffup)" "${SEED:-5}" "${OPS:-300}" "$ctx" \
    || fail "differential test over $ctx"
done
pass "differential test over the bitmap, the depth and base:allocation of one export"
