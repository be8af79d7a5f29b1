#!/usr/bin/env bash
# The newer libnbd's tools (1.22 from Debian 13's source, scripts/libnbd-new.sh)
# through bscache, in front of nbdkit 1.32 (no extended headers) and of
# qemu-nbd 10 (scripts/qemu10.sh; it serves extended headers and payload
# filtering) over 16 GiB exports with data past 4 GiB:
#  - nbdinfo --map, and a map walked with nbdsh's block_status_64, equal direct;
#  - the windows bscache fetches: longer than 4 GiB - 1 in one call (the whole
#    export) from qemu-nbd 10 when bscache is built with that libnbd (the
#    CMake feature check), never longer than a 32-bit length otherwise;
#  - zero and trim of 5 and 6 GiB through bscache: the bytes read back equal
#    upstream's, the map claims nothing upstream lacks, and a fresh bscache's
#    map equals direct;
#  - what extended headers give a client (nbdinfo --can extended-headers,
#    block_status_64 over 16 GiB in one call, block_status_filter, zero/trim
#    of more than 4 GiB in one command): checked against qemu-nbd 10 directly,
#    and through bscache, which offers extended headers to every client that
#    asks, whatever upstream speaks (#22).
# Skipped (77) without the newer libnbd; the qemu-nbd 10 half needs qemu 10
# (it reports a skip after the nbdkit half passed if qemu 10 is absent).
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
prefix=${LIBNBD_NEW_PREFIX:-$root/.cache/libnbd-new}
[[ -x $prefix/bin/nbdsh && -x $prefix/bin/nbdinfo ]] ||
  skip "the newer libnbd is not built (scripts/libnbd-new.sh; it needs the Debian mirror)"
qemu10=${QEMU10_PREFIX:-$root/.cache/qemu10}/bin
nbdinfo=$prefix/bin/nbdinfo
"$nbdinfo" --version | grep -q '^libnbd 1\.\(1[89]\|[2-9][0-9]\)\.' ||
  fail "$nbdinfo is not libnbd >= 1.18: $("$nbdinfo" --version | tail -1)"

# check WHAT CMD ARGS...: CMD must succeed (its output is shown if it fails).
check() {
  local what=$1
  shift
  "$@" >"$T/check.out" 2>&1 || {
    cat "$T/check.out" >&2
    fail "$what"
  }
  pass "$what"
}

# nbdsh URI CODE...: the newer nbdsh connected to URI asking for base:allocation
# and qemu:allocation-depth (upstream selects those it has; bscache offers
# upstream's), with the helpers of libnbd_new.py imported.
nbdsh_at() {
  local uri=$1 code
  shift
  local args=(-c "import sys; sys.path.insert(0, '$here'); from libnbd_new import *"
    -c "h.add_meta_context('base:allocation'); h.add_meta_context('qemu:allocation-depth'); h.connect_uri('$uri')")
  for code in "$@"; do args+=(-c "$code"); done
  "$prefix/bin/nbdsh" "${args[@]}"
}

# Which libnbd this bscache runs with decides how long its windows may be.
bscache_libnbd=$(ldd "$BSCACHE" | awk '$1 ~ /^libnbd\.so/ { print $3 }')
# Real paths: .cache/libnbd-new may be a symbolic link to another tree's build, and ldd names the target.
if [[ $(realpath "$bscache_libnbd") == "$(realpath "$prefix")"/* ]]; then wide=1; else wide=0; fi
echo "bscache runs with $bscache_libnbd"

# fetched_windows LOG: the lengths of the block-status windows bscache fetched
# (its debug line "fetched N extents of M contexts for OFFSET+LENGTH").
fetched_windows() { sed -n 's/.*fetched [0-9]* extents of [0-9]* contexts for [0-9]*+\([0-9]*\).*/\1/p' "$1"; }

GiB=$((1 << 30))
# Around every edge of the data and of the zero and trim below.
ranges="[(0, 2 << 20), (4 * GiB - (1 << 20), 2 << 20), (5 * GiB - (1 << 20), 3 << 20), (10 * GiB - (1 << 20), 2 << 20),
  (11 * GiB - (1 << 20), 2 << 20), (12 * GiB - (1 << 20), 3 << 20), (16 * GiB - (1 << 20), 1 << 20)]"

# check_upstream NAME: the checks on the bscache started as NAME in front of
# the upstream started as up_NAME, 16 GiB with data at 0, 5 GiB and 12 GiB.
check_upstream() {
  local name=$1 up=up_$1 fresh=fresh_$1
  local bs_uri up_uri
  bs_uri=$(uri "$name")
  up_uri=$(uri "$up")

  # The first query misses and fetches the window from 0: its length shows
  # what the connection can do.
  "$nbdinfo" --map "$up_uri" >"$T/$name.direct.map"
  "$nbdinfo" --map "$bs_uri" >"$T/$name.proxied.map" || fail "$name: nbdinfo --map through bscache"
  diff -u "$T/$name.direct.map" "$T/$name.proxied.map" || fail "$name: nbdinfo --map through bscache differs from direct"
  pass "$name: nbdinfo --map through bscache equals direct ($(wc -l <"$T/$name.direct.map") extents)"
  nbdsh_at "$up_uri" 'print_map(h)' >"$T/$name.direct.json"
  nbdsh_at "$bs_uri" 'print_map(h)' >"$T/$name.proxied.json" || fail "$name: block_status_64 through bscache"
  cmp -s "$T/$name.direct.json" "$T/$name.proxied.json" || fail "$name: the block_status_64 map differs from direct"
  pass "$name: the map walked with nbdsh's block_status_64 equals direct"

  local longest
  longest=$(fetched_windows "$T/$name.log" | sort -n | tail -n 1)
  [[ -n $longest ]] || fail "$name: bscache logged no window fetch"
  if ((upstream_extended && wide)); then
    ((longest == 16 * GiB)) || fail "$name: the longest window was $longest bytes, not the 16 GiB export in one call"
    pass "$name: bscache (libnbd >= 1.18) fetched the whole 16 GiB in one block-status call"
  else
    ((longest <= 0xffffffff)) || fail "$name: a window of $longest bytes, more than a 32-bit request carries"
    pass "$name: windows of at most 4 GiB - 1 ($longest) without extended headers to upstream or libnbd >= 1.18"
  fi

  # What extended headers give a client, whatever upstream speaks (#22).
  check "$name: nbdinfo --can extended-headers through bscache" "$nbdinfo" --can extended-headers "$bs_uri"
  if ((upstream_extended && !wide)); then
    # Both contexts are passed through in one upstream request, which libnbd
    # 1.14 keeps to 4 GiB - 1: the answer covers that much (the spec allows
    # less than asked). base:allocation alone is the cache's, whose windows join.
    check "$name: one block_status_64 over 16 GiB (base:allocation alone) through bscache answers an extent over 4 GiB" \
      "$prefix/bin/nbdsh" -c "import sys; sys.path.insert(0, '$here'); from libnbd_new import *" \
      -c "h.add_meta_context('base:allocation'); h.connect_uri('$bs_uri')" -c 'assert_long_extent(h)'
  else
    check "$name: one block_status_64 over 16 GiB through bscache answers an extent over 4 GiB" \
      nbdsh_at "$bs_uri" 'assert_long_extent(h)'
  fi
  check "$name: block_status_filter through bscache answers only the context asked" \
    nbdsh_at "$bs_uri" 'assert_filtered(h)'
  check "$name: zero of 6 GiB and trim of 5 GiB through bscache, each in one command" \
    nbdsh_at "$bs_uri" 'mutate(h, "zero", 4 * GiB, 6 * GiB, whole=True)' 'mutate(h, "trim", 11 * GiB, 5 * GiB, whole=True)'
  # The same ranges in the longest commands the client may send (one each
  # once it has extended headers): bscache forwards them as they came or split.
  nbdsh_at "$bs_uri" 'mutate(h, "zero", 4 * GiB, 6 * GiB)' 'mutate(h, "trim", 11 * GiB, 5 * GiB)' ||
    fail "$name: zero and trim through bscache"
  nbdsh_at "$bs_uri" 'assert h.pread(65536, 5 * GiB) == bytes(65536), "the zeroed range reads back data"' ||
    fail "$name: the zeroed range through bscache"
  [[ $(nbdsh_at "$bs_uri" "digest(h, $ranges)") == $(nbdsh_at "$up_uri" "digest(h, $ranges)") ]] ||
    fail "$name: the bytes through bscache differ from upstream's after zero and trim"
  pass "$name: zero of 6 GiB and trim of 5 GiB through bscache: the bytes equal upstream's"
  nbdsh_at "$up_uri" 'print_map(h)' >"$T/$name.after.direct.json"
  nbdsh_at "$bs_uri" 'print_map(h)' >"$T/$name.after.proxied.json"
  /usr/bin/python3 "$here/libnbd_new.py" "$T/$name.after.proxied.json" "$T/$name.after.direct.json" ||
    fail "$name: after zero and trim the map through bscache claims what upstream lacks"
  start_bscache "$fresh" --upstream "$up_uri"
  nbdsh_at "$(uri "$fresh")" 'print_map(h)' >"$T/$name.after.fresh.json"
  cmp -s "$T/$name.after.direct.json" "$T/$name.after.fresh.json" ||
    fail "$name: after zero and trim a fresh bscache's map differs from direct"
  pass "$name: after zero and trim the map claims nothing upstream lacks; a fresh bscache's equals direct"
}

# ---- nbdkit 1.32: no extended headers upstream --------------------------------
start_nbdkit up_nbdkit memory 16G
nbdsh_at "$(uri up_nbdkit)" 'h.pwrite(b"\xab" * (1 << 20), 0)' 'h.pwrite(b"\xcd" * 65536, 5 * GiB)' \
  'h.pwrite(b"\xef" * (1 << 20), 12 * GiB)'
if "$nbdinfo" --can extended-headers "$(uri up_nbdkit)"; then fail "nbdkit $(nbdkit --version) serves extended headers?"; fi
upstream_extended=0
start_bscache nbdkit --upstream "$(uri up_nbdkit)" --log-level debug
check_upstream nbdkit
(($(grep -c "bscache's own client, compact headers" "$T/nbdkit.log") >= 2)) ||
  fail "nbdkit: bscache's wire connections did not stay compact"
pass "nbdkit: bscache's wire connections speak compact headers"

# ---- qemu-nbd 10: extended headers and payload filtering upstream -------------
[[ -x $qemu10/qemu-nbd ]] || skip "the nbdkit half passed; qemu 10 is not fetched (scripts/qemu10.sh)"
truncate -s 16G "$T/disk.raw"
qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'write -P 0xcd 5G 64k' -c 'write -P 0xef 12G 1M' "$T/disk.raw" >/dev/null
# -e: bscache's connections and the direct ones at once; -A: a second context to filter out.
"$qemu10/qemu-nbd" -t -e 16 -A -f raw -k "$T/up_qemu.sock" --pid-file="$T/up_qemu.pid" "$T/disk.raw" \
  >"$T/up_qemu.log" 2>&1 &
PIDS+=($!)
wait_for_file "$T/up_qemu.pid"
# What the checks through bscache ask of it, true of qemu-nbd 10 itself.
"$nbdinfo" --can extended-headers "$(uri up_qemu)" || fail "qemu-nbd 10 does not serve extended headers"
nbdsh_at "$(uri up_qemu)" 'assert_long_extent(h)' || fail "qemu-nbd 10: one block_status_64 over 16 GiB"
nbdsh_at "$(uri up_qemu)" 'assert_filtered(h)' || fail "qemu-nbd 10: block_status_filter"
pass "qemu-nbd 10 directly: extended headers, block_status_64 over 16 GiB in one call, block_status_filter"
upstream_extended=1
start_bscache qemu --upstream "$(uri up_qemu)" --log-level debug --stats-file "$T/qemu.json"
check_upstream qemu
# bscache's wire connections speak extended headers to qemu-nbd 10: negotiated
# by libnbd where bscache runs with libnbd >= 1.18 (before #22 such a
# connection was not used at all), by bscache itself otherwise; and READs
# are spliced over them.
extended=$(grep -c "bscache's own client, extended headers" "$T/qemu.log" || true)
by_bscache=$(grep -c "bscache's own client, extended headers (negotiated by bscache)" "$T/qemu.log" || true)
((extended >= 2)) || fail "qemu: $extended wire connections with extended headers, not at least 2"
if ((wide)); then
  ((by_bscache == 0)) || fail "qemu: bscache negotiated extended headers itself although its libnbd does"
else
  ((by_bscache == extended)) || fail "qemu: libnbd 1.14 cannot negotiate extended headers, yet bscache did not"
fi
kill -USR1 "$(cat "$T/qemu.pid")"
wait_for_file "$T/qemu.json"
(($(jq '.upstream.reads_spliced' "$T/qemu.json") > 0)) || fail "qemu: no READ spliced over extended headers"
pass "qemu: the wire connections speak extended headers (negotiated by $( ((wide)) && echo libnbd || echo bscache)) and splice READs"
# And zero/trim of more than 4 GiB in one command, directly (the data is gone by now).
nbdsh_at "$(uri up_qemu)" 'mutate(h, "zero", 0, 6 * GiB, whole=True)' 'mutate(h, "trim", 6 * GiB, 5 * GiB, whole=True)' \
  'assert h.pread(1 << 20, 0) == bytes(1 << 20)' || fail "qemu-nbd 10: zero and trim of more than 4 GiB in one command"
pass "qemu-nbd 10 directly: zero of 6 GiB and trim of 5 GiB in one command each"
