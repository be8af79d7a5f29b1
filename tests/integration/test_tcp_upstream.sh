#!/usr/bin/env bash
# An upstream over TCP (every other test reaches nbdkit over a Unix socket):
# the meta contexts are listed and negotiated on every upstream connection
# (the listing is pushed out by hand, see list_meta_contexts in
# proxy/upstream/connect.cpp), so block status through bscache is upstream's;
# READs and WRITEs are spliced from and into TCP sockets and the bytes are
# upstream's.
source "$(dirname "$0")/lib.sh"
py=/usr/bin/python3

free_port() {
  $py -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A port can be taken between free_port and nbdkit's bind: try a few.
for _ in 1 2 3 4 5; do
  port=$(free_port)
  rm -f "$T/up.pid"
  nbdkit -f -i 127.0.0.1 -p "$port" -P "$T/up.pid" memory 64M >"$T/up.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do
    [[ -s $T/up.pid ]] && break
    kill -0 "${PIDS[-1]}" 2>/dev/null || break
    sleep 0.05
  done
  [[ -s $T/up.pid ]] && break
done
[[ -s $T/up.pid ]] || fail "nbdkit did not start on a TCP port: $(cat "$T/up.log")"
up="nbd://127.0.0.1:$port"

# Data at 0 and 32 MiB, the rest never written (holes in the memory plugin).
head -c $((6 << 20)) /dev/urandom >"$T/a"
head -c $((3 << 20)) /dev/urandom >"$T/b"
nbdcopy "$T/a" "$up" || fail "seeding upstream"
qemu-io -f raw -c "write -P 0x5a $((32 << 20)) 1M" "$up" >/dev/null || fail "seeding upstream"

start_bscache bs --upstream "$up" --stats-file "$T/bs.json"

nbdinfo --map "$up" >"$T/map.direct" || fail "nbdinfo --map direct"
nbdinfo --map "$(uri bs)" >"$T/map.bs" || fail "nbdinfo --map through bscache: $(cat "$T/bs.log")"
diff -u "$T/map.direct" "$T/map.bs" >&2 || fail "the map through bscache differs from upstream's"
grep -q hole "$T/map.bs" || fail "no holes in the map: $(cat "$T/map.bs")"
pass "block status over a TCP upstream is upstream's"

nbdcopy "$T/b" "$(uri bs)" || fail "nbdcopy in through bscache"
nbdcopy "$(uri bs)" "$T/out.bs" || fail "nbdcopy out through bscache"
nbdcopy "$up" "$T/out.direct" || fail "nbdcopy out direct"
cmp "$T/out.bs" "$T/out.direct" || fail "bytes read through bscache differ from upstream's"
cmp -n $((3 << 20)) "$T/b" "$T/out.direct" || fail "the bytes written through bscache did not land"
stop_server bs
jq -e '.upstream.reads_spliced > 0 and .upstream.writes_spliced > 0' "$T/bs.json" >/dev/null \
  || fail "nothing spliced over TCP: $(jq -c '.upstream' "$T/bs.json")"
pass "reads and writes through a TCP upstream, spliced, carry upstream's bytes"
