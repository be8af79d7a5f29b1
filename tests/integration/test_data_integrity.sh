#!/usr/bin/env bash
# Data integrity through the data path: random reads and writes (1 byte to
# 32 MiB, arbitrary offsets) from several pipelining client connections, with
# upstream multi-conn on (4 upstream connections) and off (1); every read is
# checked against a model while it runs, and at the end the upstream file must
# equal the model byte for byte (half the clients use simple replies). The
# same over a sparse qemu-nbd image, whose reads carry OFFSET_HOLE chunks; then
# targeted sparse reads by a simple-reply and a structured-reply client.
# Replay a run with SEED=n (printed below).
source "$(dirname "$0")/lib.sh"
py=/usr/bin/python3
integrity=$TEST_TOOLS/integrity
seed=${SEED:-$((RANDOM * 32768 + RANDOM))}
echo "SEED=$seed"
size=$((128 << 20))
head -c $size /dev/urandom >"$T/initial.img"

# connection ids (nbdkit log filter) that carried OP, one per line
conns_with() { grep -oE "connection=[0-9]+ $2 " "$1" | awk '{print $1}' | sort -u; }

# run_phase NAME EXPECTED_UPSTREAM_CONNECTIONS [MULTI_CONN_MODE [BSCACHE_ARGS...]]
run_phase() {
  local name=$1 want=$2 mode=${3:-}
  shift $(($# < 3 ? $# : 3))
  cp "$T/initial.img" "$T/$name.img"
  local filter=()
  [[ -n $mode ]] && filter=(--filter=multi-conn "multi-conn-mode=$mode")
  start_nbdkit "$name-up" --filter=log ${filter[0]:+"${filter[0]}"} file "$T/$name.img" logfile="$T/$name-up.txt" \
    ${filter[1]:+"${filter[1]}"}
  start_bscache "$name-bs" --upstream "$(uri "$name-up")" --stats-file "$T/$name-bs.json" "$@"
  "$integrity" "$(uri "$name-bs")" "$T/initial.img" "$T/$name.model" "$seed" 4 8 6 3000 \
    || fail "$name: data read through bscache differs from the model (SEED=$seed)"
  kill -USR1 "$(cat "$T/$name-bs.pid")"
  wait_for_file "$T/$name-bs.json" 10
  local got
  got=$(jq '.upstream.connections' "$T/$name-bs.json")
  [[ $got == "$want" ]] || fail "$name: upstream.connections is $got, expected $want"
  # With multi-conn and the default --data-path wire, the second half of the
  # connections read and write through bscache's own client, splicing READs
  # and WRITEs up to 4 MiB (the random sizes here go up to 32 MiB: larger ones
  # take a buffer).
  local wire=$((want / 2)) spliced
  [[ " $* " == *" --data-path libnbd "* ]] && wire=0
  grep -q "$want upstream connections\?, $wire of them bscache's own" "$T/$name-bs.log" \
    || fail "$name: expected $wire of $want upstream connections on bscache's own client"
  spliced=$(jq '.upstream.reads_spliced + .upstream.writes_spliced' "$T/$name-bs.json")
  if ((wire > 0)); then
    jq -e '.upstream.reads_spliced > 0 and .upstream.writes_spliced > 0' "$T/$name-bs.json" >/dev/null \
      || fail "$name: READs or WRITEs were not spliced"
  else
    ((spliced == 0)) || fail "$name: $spliced requests spliced without a wire connection"
  fi
  stop_server "$name-bs"
  cmp "$T/$name.model" "$T/$name.img" || fail "$name: upstream file differs from the model (SEED=$seed)"
  local writers readers
  writers=$(conns_with "$T/$name-up.txt" Write | wc -l)
  readers=$(conns_with "$T/$name-up.txt" Read | wc -l)
  echo "$name: writes arrived on $writers upstream connection(s), reads on $readers"
  if ((want > 1)); then
    ((writers > 1 && readers > 1)) || fail "$name: traffic was not spread over the upstream connections"
  else
    ((writers == 1 && readers == 1)) || fail "$name: more than one upstream connection without multi-conn"
  fi
  stop_server "$name-up"
}

run_phase multi 4
pass "multi-conn upstream: 4 upstream connections (reads spliced on 2 through bscache's own client), every read matched the model, upstream file equals the model"
run_phase multi-libnbd 4 "" --data-path libnbd
pass "the same with --data-path libnbd (every connection through libnbd, nothing spliced)"
run_phase single 1 disable
pass "no multi-conn upstream: 1 upstream connection, every read matched the model, upstream file equals the model"

# ---- sparse upstream: qemu-nbd sends OFFSET_HOLE chunks ----
# 96 MiB: a fully written 32 MiB region (dirties pooled buffers of every size
# class), scattered data elsewhere, holes in between (some unaligned edges).
sparse=$T/sparse.img
truncate -s $((96 << 20)) "$sparse"
put() { head -c "$2" /dev/urandom | dd of="$sparse" bs=64K iflag=fullblock oflag=seek_bytes seek="$1" conv=notrunc status=none; }
put $((32 << 20)) $((32 << 20))
put 0 $((1 << 20))
put $((5 << 20)) 65536
put $(((10 << 20) + 4096)) $((3 << 20))
put $((17 << 20)) 4096
put $((25 << 20)) 512
put $((70 << 20)) $((2 << 20))
put $(((96 << 20) - 4096)) 4096
qemu-img map --output=json -f raw "$sparse" | grep -q '"data": false' || fail "the sparse image has no holes"

# start_qemu_nbd NAME IMAGE: qemu-nbd (multi-conn: -e 4) on $T/NAME.sock
start_qemu_nbd() {
  rm -f "$T/$1.pid"
  qemu-nbd -t -e 4 -f raw -k "$T/$1.sock" --pid-file="$T/$1.pid" "$2" >"$T/$1.log" 2>&1 &
  PIDS+=($!)
  wait_for_file "$T/$1.pid"
}

# The random mix again over a sparse qemu-nbd image: reads come back as a mix
# of data and hole chunks (odd clients get them as zeroes in simple replies).
cp --sparse=always "$sparse" "$T/qemu.img"
cp "$sparse" "$T/qemu-initial.img"
start_qemu_nbd qemu-up "$T/qemu.img"
start_bscache qemu-bs --upstream "$(uri qemu-up)" --stats-file "$T/qemu-bs.json"
"$integrity" "$(uri qemu-bs)" "$T/qemu-initial.img" "$T/qemu.model" "$seed" 4 8 5 2000 \
  || fail "qemu-nbd: data read through bscache differs from the model (SEED=$seed)"
kill -USR1 "$(cat "$T/qemu-bs.pid")"
wait_for_file "$T/qemu-bs.json" 10
[[ $(jq '.upstream.connections' "$T/qemu-bs.json") == 4 ]] || fail "qemu-nbd -e 4: expected 4 upstream connections"
(($(jq '.upstream.reads_spliced' "$T/qemu-bs.json") > 0)) || fail "qemu-nbd: no READ was spliced"
stop_server qemu-bs
stop_server qemu-up
cmp "$T/qemu.model" "$T/qemu.img" || fail "qemu-nbd: upstream file differs from the model (SEED=$seed)"
pass "sparse qemu-nbd upstream (holes, spliced reads): every read matched the model, upstream file equals the model"

start_qemu_nbd qnbd "$sparse"
start_bscache sp --upstream "$(uri qnbd)" --stats-file "$T/sp.json"
$py - "$(uri sp)" "$sparse" "$seed" <<'PY' || fail "sparse reads through bscache (SEED=$seed)"
import random, sys, nbd
uri, path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
disk = open(path, "rb").read()
rng = random.Random(seed)
structured = nbd.NBD(); structured.connect_uri(uri)
simple = nbd.NBD(); simple.set_request_structured_replies(False); simple.connect_uri(uri)
assert structured.get_structured_replies_negotiated() and not simple.get_structured_replies_negotiated()
holes = 0

def check(h, name, off, n):
    global holes
    if h is structured:
        chunks = []
        got = h.pread_structured(n, off, lambda buf, o, status, err: chunks.append((o, len(buf), status)) or 0)
        holes += sum(1 for c in chunks if c[2] == nbd.READ_HOLE)
        covered = sorted((o, l) for o, l, _ in chunks)
        pos = off
        for o, l in covered:
            assert o == pos, f"{name} read {off}+{n}: chunks {covered} leave a gap or overlap at {pos}"
            pos += l
        assert pos == off + n, f"{name} read {off}+{n}: chunks cover up to {pos}"
    else:
        got = h.pread(n, off)
    if got != disk[off:off + n]:
        first = next(i for i in range(n) if got[i] != disk[off + i])
        sys.exit(f"{name} read {off}+{n}: differs from the file at {off + first} "
                 f"(got {got[first]:#x}, file {disk[off + first]:#x})")

data_start = 32 << 20
for h, name in ((structured, "structured"), (simple, "simple")):
    n = 4096
    while n <= 32 << 20:
        # A read of pure data leaves its pooled buffer full of non-zero bytes;
        # the next read of the same size class (mostly holes) gets that buffer.
        check(h, name, data_start, n)
        for off in (0, (4 << 20) + 1, (9 << 20) + 12345, (16 << 20) - n // 2, (64 << 20) + 7, (96 << 20) - n):
            off = max(0, min(off, (96 << 20) - n))
            check(h, name, off, n)
            check(h, name, data_start, n)
        n *= 2
    for _ in range(100):
        n = rng.choice([rng.randint(1, 4096), rng.randint(1, 1 << 20), rng.randint(1, 32 << 20)])
        off = rng.randint(0, (96 << 20) - n)
        check(h, name, off, n)
print(f"sparse reads equal the file; the structured client got {holes} OFFSET_HOLE chunks")
assert holes > 0, "no OFFSET_HOLE chunk reached the structured-reply client"
PY
pass "sparse qemu-nbd upstream: simple and structured clients read exactly the file; holes passed on as holes"
