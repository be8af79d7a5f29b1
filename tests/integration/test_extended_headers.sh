#!/usr/bin/env bash
# Extended headers (NBD_OPT_EXTENDED_HEADERS) between qemu 10 and bscache,
# whatever upstream speaks: nbdkit 1.32 (compact only) and qemu-nbd 10 (which
# serves them; bscache's own upstream connections stay compact). qemu 10's map
# through bscache must equal the map direct, with block-status requests longer
# than 4 GiB in use (the debug log shows them); qemu-io 10's writes, zeroes
# longer than 4 GiB and trims give the same bytes as direct. What no client
# here sends (BLOCK_STATUS_EXT read byte by byte, payload filtering, TRIM and
# WRITE_ZEROES of 9 GiB, a 1 TiB REQ_ONE hit) is checked by extended_headers.py.
source "$(dirname "$0")/lib.sh"
bin=$(qemu10_bin) || exit $?
probe=$(dirname "$0")/extended_headers.py
gib=$((1 << 30))
size=$((17 * gib))

# map_json URI: qemu-img 10's map, as comparable lines.
map_json() { "$bin/qemu-img" map --output=json "$1" | jq -c '.[] | {start, length, data, zero}'; }

# long_requests NAME COMMAND: how many requests of COMMAND longer than 4 GiB - 1
# bscache NAME's debug log shows (each request is logged with its length).
long_requests() {
  grep -oE "$2 cookie=\S+ offset=[0-9]+ length=[0-9]+" "$T/$1.log" |
    awk -F'length=' '$2 > 4294967295 { n++ } END { print n + 0 }'
}

# exercise NAME UPSTREAM_NAME: qemu 10 through bscache NAME against upstream directly.
exercise() {
  local bs=$1 up=$2
  local extended_before
  extended_before=$(grep -c "extended headers true" "$T/$bs.log" || true)
  map_json "$(uri "$up")" >"$T/$up.direct.map" || fail "qemu-img 10 map of $up"
  map_json "$(uri "$bs")" >"$T/$bs.proxied.map" || fail "qemu-img 10 map through $bs"
  diff "$T/$up.direct.map" "$T/$bs.proxied.map" || fail "$up: maps through bscache and direct differ"
  (($(grep -c "extended headers true" "$T/$bs.log") > extended_before)) ||
    fail "qemu-img 10 did not negotiate extended headers with bscache"
  local long
  long=$(long_requests "$bs" block_status)
  ((long > 0)) || fail "$up: qemu-img 10 sent no block-status request longer than 4 GiB - 1 through bscache"
  pass "$up: qemu-img 10 map through bscache equals direct ($long block-status requests over 4 GiB)"

  # Writes, a 6 GiB zero across the 4 GiB mark (-n: qemu sends it whole
  # rather than fall back to writing), a discard, then the bytes direct.
  "$bin/qemu-io" -f raw -c "write -P 0x5a $((3 * gib)) 1M" -c "write -P 0x6b $((5 * gib)) 64k" \
    -c "write -P 0x7c $((8 * gib)) 64k" -c "write -z -n $((2 * gib)) $((6 * gib))" \
    -c "write -P 0x8d $((10 * gib)) 2M" -c "discard $((10 * gib)) 1M" -c "write -P 0x9e $((11 * gib)) 4k" \
    "$(uri "$bs")" >"$T/$bs.qemu-io.out" || fail "$up: qemu-io 10 through bscache"
  "$bin/qemu-io" -f raw -c "read -P 0 $((2 * gib)) 1M" -c "read -P 0 $((3 * gib)) 1M" -c "read -P 0 $((5 * gib)) 64k" \
    -c "read -P 0x7c $((8 * gib)) 64k" -c "read -P 0x8d $((10 * gib + (1 << 20))) 1M" \
    -c "read -P 0x9e $((11 * gib)) 4k" -c "read -P 0xab $((16 * gib)) 1M" \
    "$(uri "$up")" >/dev/null || fail "$up: the writes, zeroes and discard did not reach upstream as sent"
  long=$(long_requests "$bs" write_zeroes)
  ((long > 0)) || fail "$up: qemu-io 10's 6 GiB zero did not reach bscache as one request"
  # Upstream is compact: bscache cut the zero in pieces. The map may now be
  # more cautious than upstream's (a written range is "data" until fetched
  # again), never wrong: qemu-img compare skips what block status calls
  # zero on either side, so a false claim would show as a difference.
  "$bin/qemu-img" compare -f raw -F raw "$(uri "$bs")" "$(uri "$up")" >/dev/null ||
    fail "$up: the image through bscache differs from upstream after writes, zeroes and discard"
  pass "$up: qemu-io 10 write, 6 GiB write -z and discard through bscache land as direct; compare agrees"
}

# ---- nbdkit 1.32 upstream: no extended headers at all ----------------------
start_nbdkit up memory "$size"
"$bin/qemu-io" -f raw -c "write -P 0xab $((16 * gib)) 1M" "$(uri up)" >/dev/null || fail "seeding upstream"
start_bscache bs --upstream "$(uri up)" --log-level debug
python3 "$probe" "$T/bs.sock" "$size" negotiation block_status_ext || fail "extended_headers.py (nbdkit)"
exercise bs up
python3 "$probe" "$T/bs.sock" "$size" long_commands || fail "extended_headers.py (nbdkit)"

start_nbdkit big memory 2T
start_bscache bsbig --upstream "$(uri big)"
python3 "$probe" "$T/bsbig.sock" $((2 << 40)) one_tib_hole || fail "extended_headers.py one_tib_hole"

# ---- qemu-nbd 10 upstream: serves extended headers and qemu:allocation-depth
truncate -s "$size" "$T/disk.raw"
"$bin/qemu-nbd" -t -e 8 -f raw -A -k "$T/qnbd.sock" --pid-file="$T/qnbd.pid" "$T/disk.raw" >"$T/qnbd.log" 2>&1 &
PIDS+=($!)
wait_for_file "$T/qnbd.pid"
"$bin/qemu-io" -f raw -c "write -P 0xab $((16 * gib)) 1M" "$(uri qnbd)" >/dev/null || fail "seeding qemu-nbd"
start_bscache bsq --upstream "$(uri qnbd)" --log-level debug
python3 "$probe" "$T/bsq.sock" "$size" negotiation block_status_ext filter || fail "extended_headers.py (qemu-nbd 10)"
exercise bsq qnbd
python3 "$probe" "$T/bsq.sock" "$size" long_commands || fail "extended_headers.py (qemu-nbd 10)"
