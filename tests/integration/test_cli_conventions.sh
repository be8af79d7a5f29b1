#!/usr/bin/env bash
# nbdkit's command-line conventions work the same with bscache: -s (one
# client on stdin, or from socket activation as nbdinfo/nbdcopy '[ CMD ]'
# start a server), --exit-with-parent, --tls-verify-peer with a PSK, -U -,
# -P, -f, -r, -p, -i and --run's variables. Every answer is compared with the
# same client talking to upstream directly.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)

# An image with data and holes, so that a map has something to get wrong.
truncate -s 64M "$T/disk.img"
for off in 3 40 41 97; do
  head -c $((192 * 1024)) /dev/urandom | dd of="$T/disk.img" bs=64K seek=$((off * 8)) conv=notrunc status=none
done
start_nbdkit up file "$T/disk.img"
direct_map=$(nbdinfo --map "$(uri up)")
nbdcopy "$(uri up)" "$T/direct.img"

# gone PID [SECONDS]: true once PID has exited (zombies count as gone).
gone() {
  local pid=$1 limit=${2:-10}
  for _ in $(seq $((limit * 20))); do
    [[ $(ps -o stat= -p "$pid" 2>/dev/null) == Z* || -z $(ps -o pid= -p "$pid" 2>/dev/null) ]] && return 0
    sleep 0.05
  done
  return 1
}

# ---- -s under socket activation: nbdcopy and nbdinfo '-- [ CMD ]' ----
# (libnbd runs CMD with LISTEN_FDS and stdin on /dev/null, and SIGTERMs it at close.)
nbdcopy -- [ "$BSCACHE" -s --upstream "$(uri up)" ] "$T/copied.img" 2>"$T/copy.log" || fail "nbdcopy -- [ bscache -s ]"
cmp -s "$T/direct.img" "$T/copied.img" || fail "nbdcopy through -s: bytes differ from direct"
map=$(nbdinfo --map -- [ "$BSCACHE" -s --upstream "$(uri up)" ] 2>"$T/map.log") || fail "nbdinfo --map -- [ bscache -s ]"
[[ $map == "$direct_map" ]] || fail "nbdinfo --map through -s differs from direct: $map"
size=$(nbdinfo --size -- [ "$BSCACHE" -s --upstream-command 'nbdkit memory 1M' ] 2>"$T/ucmd.log") \
  || fail "nbdinfo -- [ bscache -s --upstream-command ]"
[[ $size == 1048576 ]] || fail "nbdinfo -- [ bscache -s --upstream-command 'nbdkit memory 1M' ]: size $size"
pass "-s from socket activation: nbdcopy bytes and nbdinfo --map equal to direct, --upstream-command"
# As with nbdkit, no option at all: bscache serves the sockets it was passed.
map=$(nbdinfo --map -- [ "$BSCACHE" --upstream "$(uri up)" ] 2>"$T/map.log") || fail "nbdinfo -- [ bscache ]"
[[ $map == "$direct_map" ]] || fail "nbdinfo --map -- [ bscache ] differs from direct: $map"
pass "socket activation without -s or --systemd, as nbdkit"

# ---- -s on stdin: nbd_connect_command's socketpair; bscache exits by itself ----
# The client disconnects; bscache must then exit 0 on its own (libnbd only
# waits for a command it connected to), its stats written and its
# --upstream-command server stopped. Bytes and map compared with direct.
/usr/bin/python3 - "$BSCACHE" "$T" "$(uri up)" <<'PY' >"$T/stdin.out" 2>"$T/stdin.log" || fail "-s on stdin: $(tail -5 "$T/stdin.log")"
import hashlib, os, socket, subprocess, sys, time
import nbd

bscache, tmp, upstream = sys.argv[1:4]

def serve(*args, stats):
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([bscache, "-s", "--stats-file", stats, *args], stdin=theirs, stdout=theirs,
                            stderr=open(os.path.join(tmp, "single.log"), "a"))
    theirs.close()
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_socket(ours.detach())
    return proc, h

def extents(h):
    """The whole disk's base:allocation map, adjacent equal extents merged
    (a server may split its answer anywhere)."""
    out, offset, size = [], 0, h.get_size()
    while offset < size:
        got = []
        def cb(context, start, entries, err):
            got.extend(zip(entries[0::2], entries[1::2]))
        h.block_status(size - offset, offset, cb)
        for length, flags in got:
            length = min(length, size - offset)
            if out and out[-1][1] == flags:
                out[-1][0] += length
            else:
                out.append([length, flags])
            offset += length
            if offset >= size:
                break
    return out

def finish(proc, h, what):
    h.shutdown()
    del h
    try:
        rc = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        sys.exit(f"{what}: bscache -s did not exit after its client disconnected")
    if rc != 0:
        sys.exit(f"{what}: bscache -s exited {rc}")

proc, h = serve("--upstream", upstream, stats=os.path.join(tmp, "single.json"))
data = b"".join(h.pread(4 << 20, offset) for offset in range(0, h.get_size(), 4 << 20))
with open(os.path.join(tmp, "direct.img"), "rb") as f:
    if hashlib.sha256(data).digest() != hashlib.sha256(f.read()).digest():
        sys.exit("-s on stdin: bytes differ from direct")
d = nbd.NBD()
d.add_meta_context("base:allocation")
d.connect_uri(upstream)
if extents(h) != extents(d):
    sys.exit(f"-s on stdin: block status {extents(h)} differs from direct {extents(d)}")
finish(proc, h, "--upstream")

proc, h = serve("--upstream-command", "nbdkit memory 3M", stats=os.path.join(tmp, "single-cmd.json"))
children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
h.pwrite(b"x" * 4096, 4096)
if h.pread(4096, 4096) != b"x" * 4096 or h.get_size() != 3 << 20:
    sys.exit("-s with --upstream-command: wrong size or data")
finish(proc, h, "--upstream-command")
if not children:
    sys.exit("-s with --upstream-command: no upstream server child seen")
for pid in children:
    if os.path.exists(f"/proc/{pid}"):
        sys.exit(f"-s: the upstream server (pid {pid}) outlived bscache")
print("ok")
PY
[[ -s $T/single.json && -s $T/single-cmd.json ]] || fail "-s on stdin: no stats file written at exit"
jq -e . "$T/single.json" >/dev/null || fail "-s: the stats file is not JSON"
grep -q "NBDMAGIC" "$T/single.log" && fail "-s: protocol bytes reached stderr"
pass "-s on stdin: bytes and block status equal to direct, exits 0 when its client leaves, stats written, upstream child stopped"

# ---- -s refusals ----
expect_exit() {  # expect_exit STATUS PATTERN ARGS... (stdin from $STDIN, default /dev/null)
  local status=$1 pattern=$2 rc=0; shift 2
  timeout 20 "$BSCACHE" "$@" <"${STDIN:-/dev/null}" >"$T/err.out" 2>&1 || rc=$?
  ((rc == status)) || { cat "$T/err.out"; fail "bscache $* exited $rc, not $status"; }
  grep -q -- "$pattern" "$T/err.out" || { cat "$T/err.out"; fail "bscache $*: no '$pattern'"; }
}
for conflict in "--unix $T/x.sock" "--port 0" "--systemd" "--run true"; do
  # shellcheck disable=SC2086 # the option and its value are two words
  expect_exit 2 "cannot be combined with" -s --upstream "$(uri up)" $conflict
done
expect_exit 1 "stdin is a character device" -s --upstream "$(uri up)"
mkfifo "$T/fifo"
exec 7<>"$T/fifo"  # a writer, so that opening it for reading does not block
STDIN=$T/fifo expect_exit 1 "stdin is a pipe" -s --upstream "$(uri up)"
exec 7>&-
pass "-s with --unix/--port/--systemd/--run refused (exit 2); stdin not a socket: a clear error"

# ---- --exit-with-parent: the parent is SIGKILLed ----
# A parent shell starts bscache (with an upstream child) and is SIGKILLed; both
# must go, bscache cleanly (its pidfile removed at exit). First the control:
# without the option bscache outlives its parent.
orphan() {  # orphan NAME ARGS...: a shell starts bscache, the shell is SIGKILLed; sets ORPHAN to bscache's pid
  local name=$1 parent; shift
  bash -c '"$@" & wait' sh "$BSCACHE" --upstream-command 'nbdkit memory 1M' --unix "$T/$name.sock" \
    --pidfile "$T/$name.pid" "$@" >/dev/null 2>"$T/$name.log" &
  parent=$!
  PIDS+=("$parent")
  wait_for_file "$T/$name.pid"
  ORPHAN=$(cat "$T/$name.pid")
  ORPHAN_CHILD=$(pgrep -P "$ORPHAN") || fail "$name: no upstream child of bscache"
  PIDS+=("$ORPHAN" "$ORPHAN_CHILD")
  kill -9 "$parent"
  wait "$parent" 2>/dev/null || true  # reaped here, so bash does not report it as "Killed"
}
orphan control
control=$ORPHAN
sleep 1
kill -0 "$control" 2>/dev/null || fail "control: bscache without --exit-with-parent died with its parent"
kill "$control"
gone "$control" || fail "control bscache did not stop"
orphan ewp --exit-with-parent
pid=$ORPHAN
child=$ORPHAN_CHILD
gone "$pid" 5 || fail "--exit-with-parent: bscache outlived its SIGKILLed parent"
gone "$child" 5 || fail "--exit-with-parent: the upstream server outlived bscache"
[[ ! -e $T/ewp.pid ]] || fail "--exit-with-parent: no clean shutdown (pidfile left)"
grep -q "signal 15: shutting down" "$T/ewp.log" || fail "--exit-with-parent: no SIGTERM shutdown logged"
pass "--exit-with-parent: bscache and its upstream child exit when the parent is SIGKILLed"

# SIGKILL of bscache itself: its upstream server (parent-death signal) goes
# too. qemu-nbd -t, because Debian's nbdkit 1.32 asks for a parent-death
# signal of its own (strace shows PR_SET_PDEATHSIG without --exit-with-parent)
# and would pass this check whatever bscache did.
start_bscache killed --upstream-command "qemu-nbd -t -f raw $T/disk.img"
pid=$(cat "$T/killed.pid")
child=$(pgrep -P "$pid") || fail "no upstream child of bscache"
PIDS+=("$child")
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
gone "$child" 5 || fail "the --upstream-command server outlived a SIGKILLed bscache"
pass "--upstream-command's server (qemu-nbd -t) exits when bscache is SIGKILLed"

# ---- TLS as nbdkit takes it: --tls-verify-peer with a PSK ----
PKI=$T/pki
bash "$here/tls_pki.sh" "$PKI"
psk_uri() { echo "nbds+unix://alice@/?socket=$T/$1.sock&tls-psk-file=$PKI/$2"; }
start_bscache psk --upstream "$(uri up)" --tls=require --tls-psk="$PKI/keys.psk" --tls-verify-peer
[[ $(nbdinfo --map "$(psk_uri psk keys.psk)") == "$direct_map" ]] || fail "PSK client with --tls-verify-peer"
if nbdinfo --size "$(psk_uri psk wrong.psk)" >/dev/null 2>&1; then fail "--tls-verify-peer: a wrong PSK was accepted"; fi
if nbdinfo --size "$(uri psk)" >/dev/null 2>&1; then fail "--tls=require: a plain client was served"; fi
stop_server psk
pass "--tls=require --tls-psk=F --tls-verify-peer serves a PSK client, refuses a wrong key and a plain client"

# ---- -U -, --run's variables, -P, -f, -r, -p, -i ----
mkdir "$T/cwd"
(cd "$T/cwd" && "$BSCACHE" --upstream "$(uri up)" -U - --run \
  'test -S "$unixsocket" && test "$uri" = "nbd+unix:///?socket=$unixsocket" && test "$nbd" = "$uri" &&
   test -z "${tls-}" && test -n "${exportname+set}" && test -z "$exportname" &&
   echo "$unixsocket" >'"$T/sockpath"' && nbdinfo --map "$uri"' >"$T/run.map" 2>"$T/run.log") \
  || fail "-U - --run: $(tail -3 "$T/run.log")"
[[ $(cat "$T/run.map") == "$direct_map" ]] || fail "-U - --run: map differs from direct"
[[ ! -e $T/cwd/- ]] || fail "-U - made a socket named '-'"
[[ ! -e $(dirname "$(cat "$T/sockpath")") ]] || fail "-U -: the private directory was left behind"
pass "-U - with --run: a private socket, \$uri \$nbd \$unixsocket \$exportname set, removed at exit"

"$BSCACHE" -f -r --upstream "$(uri up)" -p 0 -i 127.0.0.1 -P "$T/p.pid" --run \
  'cat '"$T/p.pid"' >'"$T/p.seen"' && test "$uri" = "nbd://127.0.0.1:$port" &&
   qemu-io -f raw -c "write 0 4k" "$uri" 2>&1' >"$T/ro.out" 2>"$T/ro.log" && fail "-r: a write was not refused"
[[ $(cat "$T/p.seen") =~ ^[0-9]+$ ]] || fail "-P: no pid in the pidfile: $(cat "$T/p.seen")"
grep -qi "permission denied\|not permitted\|read-only" "$T/ro.out" || fail "-r: the write failed for another reason: $(cat "$T/ro.out")"
[[ ! -e $T/p.pid ]] || fail "-P: pidfile left behind"
"$BSCACHE" --foreground --read-only --upstream "$(uri up)" --pid-file "$T/q.pid" --ipaddr 127.0.0.1 --port 0 \
  --run 'test -s '"$T/q.pid"' && nbdinfo --size "$uri"' >"$T/size" 2>"$T/run.log" || fail "nbdkit's long spellings"
[[ $(cat "$T/size") == 67108864 ]] || fail "nbdkit's long spellings: wrong size"
"$BSCACHE" --upstream "$(uri up)" --tls=on --tls-psk="$PKI/keys.psk" --run 'test "$tls" = 1' 2>"$T/run.log" \
  || fail "--tls=on: \$tls is not 1"
"$BSCACHE" --upstream "$(uri up)" --tls=require --tls-psk="$PKI/keys.psk" --run 'test "$tls" = 2' 2>"$T/run.log" \
  || fail "--tls=require: \$tls is not 2"
pass "-P, -f, -r, -p, -i and --pid-file, --foreground, --read-only, --ipaddr; \$tls as nbdkit sets it"
