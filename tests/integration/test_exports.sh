#!/usr/bin/env bash
# Many exports through one bscache (--exports passthrough, the default when
# the URI names no export), against nbdkit's file plugin serving a directory:
# LIST equals upstream's, every export maps as direct, each has its own cache
# and counters, a write to one leaves another's cache alone, unknown names get
# NBD_REP_ERR_UNKNOWN with the reason, --max-exports refuses with ERR_POLICY
# and makes room by closing the least recently used idle export,
# --export-idle-timeout closes idle exports, "" and the name upstream gives it
# share one cache, and a single named export of qemu-nbd goes through too.
source "$(dirname "$0")/lib.sh"
py=/usr/bin/python3

mkdir "$T/dir"
# Three sparse disks of different sizes and layouts.
make_disk() {  # NAME SIZE_MIB DATA_OFFSETS_MIB...
  local name=$1 size=$2; shift 2
  truncate -s "${size}M" "$T/dir/$name"
  for off in "$@"; do
    head -c 1M /dev/urandom | dd of="$T/dir/$name" bs=1M seek="$off" conv=notrunc status=none
  done
}
make_disk a.img 16 1 5 9
make_disk b.img 32 0 2 3 20 31
make_disk c.img 8 4

start_nbdkit up file dir="$T/dir"
start_bscache bs --upstream "$(uri up)" --stats-file "$T/bs.json" --export-idle-timeout 60s
export_uri() { echo "nbd+unix:///$2?socket=$T/$1.sock"; }
map() { qemu-img map --output=json -f raw "$(export_uri "$1" "$2")"; }
stats() { kill -USR1 "$(cat "$T/bs.pid")"; sleep 0.3; cat "$T/bs.json"; }

# LIST: the same exports (names and sizes) as upstream's.
list() { nbdinfo --list --json "$(uri "$1")" | jq -c '[.exports[] | {name: ."export-name", size: ."export-size"}] | sort_by(.name)'; }
[[ $(list bs) == "$(list up)" ]] || fail "nbdinfo --list through bscache $(list bs), direct $(list up)"
[[ $(list bs | jq length) == 3 ]] || fail "expected three exports listed, got $(list bs)"
pass "nbdinfo --list through bscache equals direct (3 exports)"

for e in a.img b.img c.img; do
  [[ $(map bs "$e") == "$(map up "$e")" ]] || fail "qemu-img map of $e differs from direct"
done
jq -e '.exports | keys == ["a.img", "b.img", "c.img"]' <(stats) >/dev/null || fail "stats: $(stats | jq -c '.exports | keys')"
pass "qemu-img map of every export equals direct; stats have one entry per export"

# A write to a.img updates a.img's cache and leaves b.img's alone.
map bs a.img >/dev/null && map bs b.img >/dev/null   # both warm
before=$(stats)
qemu-io -f raw -c 'write -P 7 12M 1M' "$(export_uri bs a.img)" >/dev/null || fail "write to a.img"
[[ $(map bs a.img) == "$(map up a.img)" ]] || fail "a.img after the write differs from direct"
[[ $(map bs b.img) == "$(map up b.img)" ]] || fail "b.img after the write to a.img differs from direct"
after=$(stats)
delta() { echo $(($(jq "$2" <<<"$after") - $(jq "$2" <<<"$before"))); }
(($(delta x '.exports["a.img"].cache.ranges_invalidated') >= 1)) || fail "a.img's cache did not see its write"
(($(delta x '.exports["b.img"].cache.ranges_invalidated') == 0)) || fail "b.img's cache saw a.img's write"
(($(delta x '.exports["b.img"].block_status.misses') == 0)) || fail "b.img missed after a write to a.img"
(($(delta x '.exports["b.img"].block_status.hits') >= 1)) || fail "b.img's map was not answered from its cache"
(($(delta x '.exports["b.img"].client.requests.write') == 0)) || fail "b.img counted a.img's write"
(($(delta x '.client.requests.write') == $(delta x '.exports["a.img"].client.requests.write'))) \
  || fail "total writes differ from a.img's"
pass "a write to a.img updates only a.img's cache; b.img is answered from its own, untouched"

# Concurrent clients on different exports.
mappers=()
for e in a.img b.img c.img; do
  map bs "$e" >"$T/par.$e" &
  mappers+=($!)
done
wait "${mappers[@]}"
for e in a.img b.img c.img; do
  [[ $(cat "$T/par.$e") == "$(map up "$e")" ]] || fail "concurrent map of $e differs"
done
pass "concurrent clients on three exports"

# One cache budget for all exports: --cache-max-extents bounds the sum, the
# least recently used windows go first, whichever export they are of.
start_bscache tiny --upstream "$(uri up)" --cache-max-extents 12 --stats-file "$T/tiny.json"
for e in a.img b.img c.img a.img b.img c.img; do
  [[ $(map tiny "$e") == "$(map up "$e")" ]] || fail "map of $e with a 12-extent budget differs from direct"
done
kill -USR1 "$(cat "$T/tiny.pid")"
wait_for_file "$T/tiny.json"
jq -e '([.exports[].cache.extents] | add) == .cache.extents and .cache.extents <= 12 and .cache.max_extents == 12
       and .exports["a.img"].cache.evictions >= 1' "$T/tiny.json" >/dev/null \
  || fail "budget: $(jq -c '{total: .cache, each: [.exports[] | .cache | {extents, evictions}]}' "$T/tiny.json")"
stop_server tiny
pass "--cache-max-extents 12 bounds the three exports' caches together; maps stay as direct"

# A name upstream refuses: NBD_REP_ERR_UNKNOWN (libnbd: ENOENT) with upstream's reason; the others keep working.
$py - "$T/bs.sock" <<'PY' || fail "unknown export"
import errno, sys, nbd
h = nbd.NBD()
said = []  # libnbd logs the server's error message only in its debug output
h.set_debug_callback(lambda context, message: said.append(message))
h.set_debug(True)
h.set_opt_mode(True)
h.connect_unix(sys.argv[1])
h.set_export_name("nope.img")
try:
    h.opt_info()
    sys.exit("INFO of an unknown export succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOENT, f"expected ERR_UNKNOWN (ENOENT), got {e.errnum}: {e}"
    assert any('server error message: ' in m and 'No such file or directory' in m
               for m in said), said
h.set_debug(False)
h.set_export_name("b.img")
h.opt_go()          # the same connection may still choose a real export
assert h.get_size() == 32 << 20
PY
grep -q 'export "nope.img" refused: .*No such file or directory' "$T/bs.log" || fail "no log line for the refusal"
pass "an export upstream refuses gets ERR_UNKNOWN with upstream's reason, and the client may go on to a real one"

# "" is upstream's default export. Without one (nbdkit file dir= has none) it is refused with upstream's message.
nbdinfo "$(uri bs)" >"$T/default.out" 2>&1 && fail "the default export opened on an upstream without one"
grep -q 'export "" refused: .*No such file or directory' "$T/bs.log" || fail "upstream's reason not logged"
pass "no default export upstream: refused with upstream's reason"
stop_server bs

# --max-exports 2: a third export is refused while two are in use, and gets in once one is idle.
start_bscache lim --upstream "$(uri up)" --max-exports 2 --export-idle-timeout 60s
$py - "$T/lim.sock" "$T/lim.log" <<'PY' || fail "--max-exports"
import sys, time, nbd
sock, log = sys.argv[1], sys.argv[2]
def connect(name):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    return h
a, b = connect("a.img"), connect("b.img")
try:
    connect("c.img")
    sys.exit("a third export opened with --max-exports 2 and two in use")
except nbd.Error as e:
    assert "server policy prevents" in e.string, f"expected ERR_POLICY, got {e}"
    assert "refused: bscache already serves 2 exports, all in use (--max-exports 2)" in open(log).read()
a.shutdown()
del a
# a.img is idle once bscache has seen the disconnect: then it is closed to make room.
deadline = time.monotonic() + 10
while True:
    try:
        c = connect("c.img")
        break
    except nbd.Error:
        assert time.monotonic() < deadline, "c.img still refused 10 s after a.img's client left"
        time.sleep(0.05)
assert c.get_size() == 8 << 20
assert b.pread(4096, 0) is not None
assert 'export "a.img" closed: least recently used' in open(log).read()
PY
pass "--max-exports: ERR_POLICY naming the limit while all are in use; the least recently used idle export makes room"
stop_server lim

# --export-idle-timeout: an export with no client is closed, its upstream connections too.
start_bscache idle --upstream "$(uri up)" --export-idle-timeout 1s --stats-file "$T/idle.json"
map idle c.img >/dev/null
for _ in $(seq 100); do grep -q 'export "c.img" closed: no client' "$T/idle.log" && break; sleep 0.05; done
grep -q 'export "c.img" closed: no client for 1000 ms' "$T/idle.log" || fail "c.img not closed after 1 s idle"
kill -USR1 "$(cat "$T/idle.pid")"
wait_for_file "$T/idle.json"
jq -e '.exports["c.img"].open == false and .exports["c.img"].block_status.misses >= 1 and .upstream.connections == 0' \
  "$T/idle.json" >/dev/null || fail "stats after the idle close: $(jq -c '.exports, .upstream' "$T/idle.json")"
# Deleted upstream while idle: a new client is refused; the others still work.
rm "$T/dir/c.img"
sleep 5.1   # past the listing's lifetime, so upstream's new list is seen
nbdinfo "$(export_uri idle c.img)" >"$T/gone.out" 2>&1 && fail "a deleted export opened"
[[ $(map idle a.img) == "$(map up a.img)" ]] || fail "a.img after c.img was deleted"
[[ $(list idle | jq length) == 2 ]] || fail "LIST still shows the deleted export: $(list idle)"
pass "--export-idle-timeout closes an idle export (stats keep its counters); one deleted upstream is refused"
stop_server idle

# "" and the name upstream reports for it are one export with one cache: a
# write through one name is seen through the other.
start_nbdkit dflt --filter=exportname file dir="$T/dir" default-export=a.img
start_bscache al --upstream "$(uri dflt)" --stats-file "$T/al.json"
map al a.img >/dev/null       # cached under a.img
qemu-io -f raw -c 'write -P 9 14M 1M' "$(uri al)" >/dev/null || fail "write through the default export"
[[ $(map al a.img) == "$(map dflt a.img)" ]] || fail "a.img's map is stale after a write through \"\""
stop_server al
jq -e '.exports | keys == ["a.img"]' "$T/al.json" >/dev/null || fail "\"\" and a.img are two exports: $(jq -c '.exports | keys' "$T/al.json")"
pass "the default export and its canonical name share one export and one cache"

# qemu-nbd serving one named export.
qemu-img create -f qcow2 "$T/q.qcow2" 64M >/dev/null
qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -P 2 40M 2M' "$T/q.qcow2" >/dev/null
qemu-nbd -f qcow2 -x disk1 --persistent --shared=8 --socket="$T/q.sock" --pid-file="$T/q.pid" --fork "$T/q.qcow2"
PIDS+=("$(cat "$T/q.pid")")
start_bscache bq --upstream "nbd+unix:///?socket=$T/q.sock"
[[ $(list bq) == "$(list q)" ]] || fail "qemu-nbd's list through bscache: $(list bq)"
[[ $(map bq disk1) == "$(map q disk1)" ]] || fail "qemu-nbd disk1 map differs"
pass "qemu-nbd -x disk1: listed and mapped through bscache as direct"
