#!/usr/bin/env bash
# Extended headers (NBD_OPT_EXTENDED_HEADERS) between qemu 10 and bscache,
# whatever upstream speaks: nbdkit 1.32 (compact only) and qemu-nbd 10 (which
# serves them). Upstream, bscache's own wire connections negotiate them where
# upstream serves them (by themselves where libnbd cannot), and fall back to
# compact headers where it refuses: the stats count them, one 5 GiB
# WRITE_ZEROES and one 5 GiB TRIM go to qemu-nbd 10 as one command each (its
# trace shows what it received) and to nbdkit in pieces (its log filter
# shows them), and again after qemu-nbd restarts (the reconnect takes the
# same path). qemu 10's map
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

# stat NAME JQ_FILTER: from the stats bscache NAME writes on SIGUSR1.
stat() {
  rm -f "$T/$1.json"
  kill -USR1 "$(cat "$T/$1.pid")"
  wait_for_file "$T/$1.json"
  jq -r "$2" "$T/$1.json"
}

# upstream_ops NAME: WRITE_ZEROES and TRIM commands upstream NAME received:
# qemu-nbd's trace of each request it decodes, nbdkit's log filter.
upstream_ops() {
  case $1 in
    up) echo "$(grep -c '^.* Zero ' "$T/up.ops" || true) $(grep -c '^.* Trim ' "$T/up.ops" || true)" ;;
    qnbd) echo "$(grep -c 'type = 6 (write zeroes)' "$T/qnbd.log" || true) $(grep -c 'type = 4 (trim)' "$T/qnbd.log" || true)" ;;
  esac
}

# long_zero_and_trim NAME UPSTREAM_NAME ZEROES TRIMS: one 5 GiB WRITE_ZEROES
# and one 5 GiB TRIM through bscache NAME reach upstream as ZEROES and TRIMS
# commands (bscache's counters and upstream's own count agree).
long_zero_and_trim() {
  local bs=$1 up=$2 zeroes=$3 trims=$4
  local before after counted_zeroes counted_trims
  before=$(upstream_ops "$up")
  counted_zeroes=$(stat "$bs" '.upstream.requests.write_zeroes // 0')
  counted_trims=$(stat "$bs" '.upstream.requests.trim // 0')
  python3 "$probe" "$T/$bs.sock" "$size" five_gib_zero_and_trim || fail "$up: extended_headers.py five_gib_zero_and_trim"
  after=$(upstream_ops "$up")
  read -r z0 t0 <<<"$before"
  read -r z1 t1 <<<"$after"
  ((z1 - z0 == zeroes && t1 - t0 == trims)) ||
    fail "$up: upstream received $((z1 - z0)) WRITE_ZEROES and $((t1 - t0)) TRIM commands, not $zeroes and $trims"
  (($(stat "$bs" '.upstream.requests.write_zeroes') - counted_zeroes == zeroes)) ||
    fail "$up: bscache counted another number of upstream WRITE_ZEROES than $zeroes"
  (($(stat "$bs" '.upstream.requests.trim') - counted_trims == trims)) ||
    fail "$up: bscache counted another number of upstream TRIMs than $trims"
  pass "$up: a 5 GiB WRITE_ZEROES and a 5 GiB TRIM went upstream as $zeroes and $trims commands"
}

# wire_headers NAME FORM: bscache NAME's wire connections logged FORM headers.
wire_headers() { grep -c "bscache's own client, $2 headers" "$T/$1.log" || true; }

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
start_nbdkit up --filter=log memory "$size" logfile="$T/up.ops"
"$bin/qemu-io" -f raw -c "write -P 0xab $((16 * gib)) 1M" "$(uri up)" >/dev/null || fail "seeding upstream"
start_bscache bs --upstream "$(uri up)" --log-level debug --stats-file "$T/bs.json"
python3 "$probe" "$T/bs.sock" "$size" negotiation block_status_ext || fail "extended_headers.py (nbdkit)"
# The export is open now. nbdkit refuses NBD_OPT_EXTENDED_HEADERS: the wire connections fall back.
(($(wire_headers bs compact) == 2 && $(wire_headers bs extended) == 0)) ||
  fail "nbdkit: bscache's 2 wire connections did not fall back to compact headers"
(($(stat bs '.upstream.extended_headers') == 0)) || fail "nbdkit: the stats count extended headers upstream"
pass "nbdkit: the wire connections fell back to compact headers (ERR_UNSUP)"
exercise bs up
python3 "$probe" "$T/bs.sock" "$size" long_commands || fail "extended_headers.py (nbdkit)"
# 2 GiB pieces: 2 + 2 + 1.
long_zero_and_trim bs up 3 3

start_nbdkit big memory 2T
start_bscache bsbig --upstream "$(uri big)"
python3 "$probe" "$T/bsbig.sock" $((2 << 40)) one_tib_hole || fail "extended_headers.py one_tib_hole"

# ---- qemu-nbd 10 upstream: serves extended headers and qemu:allocation-depth
truncate -s "$size" "$T/disk.raw"
# start_qemu_nbd: qemu-nbd 10 on $T/qnbd.sock, tracing every request it decodes.
start_qemu_nbd() {
  rm -f "$T/qnbd.pid"
  "$bin/qemu-nbd" -t -e 8 -f raw -A -k "$T/qnbd.sock" --pid-file="$T/qnbd.pid" \
    -T nbd_co_receive_request_decode_type "$T/disk.raw" >>"$T/qnbd.log" 2>&1 &
  PIDS+=($!)
  wait_for_file "$T/qnbd.pid"
}
start_qemu_nbd
"$bin/qemu-io" -f raw -c "write -P 0xab $((16 * gib)) 1M" "$(uri qnbd)" >/dev/null || fail "seeding qemu-nbd"
start_bscache bsq --upstream "$(uri qnbd)" --log-level debug --stats-file "$T/bsq.json"
python3 "$probe" "$T/bsq.sock" "$size" negotiation block_status_ext filter || fail "extended_headers.py (qemu-nbd 10)"
# The export is open now. Both wire connections speak extended headers to qemu-nbd 10 (negotiated by
# bscache where its libnbd cannot; libnbd >= 1.18 negotiates them for its
# connections too).
(($(wire_headers bsq extended) == 2 && $(wire_headers bsq compact) == 0)) ||
  fail "qemu-nbd 10: bscache's 2 wire connections did not negotiate extended headers"
extended=$(stat bsq '.upstream.extended_headers')
((extended >= 2)) || fail "qemu-nbd 10: the stats count $extended connections with extended headers, not at least 2"
pass "qemu-nbd 10: the wire connections run with extended headers ($extended of 4 connections)"
exercise bsq qnbd
python3 "$probe" "$T/bsq.sock" "$size" long_commands || fail "extended_headers.py (qemu-nbd 10)"
long_zero_and_trim bsq qnbd 1 1
(($(stat bsq '.upstream.reads_spliced') > 0)) || fail "qemu-nbd 10: no READ was spliced over extended headers"
pass "qemu-nbd 10: READs spliced over extended headers"

# qemu-nbd restarts: every connection reconnects, the wire ones through the same path.
kill "$(cat "$T/qnbd.pid")"
for _ in $(seq 100); do [[ -S $T/qnbd.sock ]] || break; sleep 0.05; done
start_qemu_nbd
# Each wire connection logs its headers when it (re)connects: 2 more once both are back.
for _ in $(seq 200); do
  (($(wire_headers bsq extended) + $(wire_headers bsq compact) >= 4)) && (($(stat bsq '.upstream.connections') == 4)) &&
    break
  sleep 0.1
done
(($(stat bsq '.upstream.connections') == 4)) || fail "qemu-nbd 10: bscache did not reconnect"
(($(wire_headers bsq extended) == 4)) || fail "qemu-nbd 10: the reconnected wire connections lost extended headers"
(($(stat bsq '.upstream.extended_headers') == extended)) || fail "qemu-nbd 10: fewer extended headers after the reconnect"
pass "qemu-nbd 10: after a restart of upstream the wire connections reconnected with extended headers"
long_zero_and_trim bsq qnbd 1 1
"$bin/qemu-img" compare -f raw -F raw "$(uri bsq)" "$(uri qnbd)" >/dev/null ||
  fail "qemu-nbd 10: the image through bscache differs from upstream after the reconnect"
pass "qemu-nbd 10: the image through bscache equals upstream's after the reconnect"
