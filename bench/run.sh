#!/usr/bin/env bash
# Benchmarks bscache against direct access, nbdkit's cacheextents filter and
# (where it applies) an instant upstream, in one run on this machine. Every
# server is started and stopped here; every contender's map output must equal
# direct's. Writes bench/results/RESULTS.md, raw.tsv and ratios.png.
#
# usage: bench/run.sh [--quick] [--out DIR] [--only SECTIONS]
#   --quick      3 runs per contender and smaller images (6.5 minutes on 2026-12-02)
#   --only S     run only these sections (comma-separated: seq, big-sparse,
#                write-mix, incremental-backup, tmpfs, hit-latency, data-path, tcp, memory,
#                capacity-pressure, multi-export, tls, micro) and replace just their rows in an
#                existing raw.tsv
#   BENCH_TINY=1 one run on tiny images: only checks the harness works
#   BSCACHE_BASELINE=PATH also runs an older bscache binary as contender
#                "bscache-baseline" in the data-path, tcp and convert rows (before/after)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
mode=full
out=$here/results
only=""
while (($#)); do
  case $1 in
    --quick) mode=quick ;;
    --out) out=$2; shift ;;
    --only) only=",$2,"; shift ;;
    *) echo "usage: $0 [--quick] [--out DIR] [--only SECTIONS]" >&2; exit 2 ;;
  esac
  shift
done
[[ ${BENCH_TINY:-0} == 1 ]] && mode=tiny
mkdir -p "$out"

if [[ -z ${BSCACHE:-} ]]; then
  "$repo/scripts/deps.sh"
  BUILD_DIR=$repo/build "$repo/scripts/build.sh" >/dev/null
  BSCACHE=$repo/build/bscache
fi
tools=$(dirname "$BSCACHE")
source "$repo/tests/integration/lib.sh"  # start_nbdkit, start_bscache, stop_server, uri; cleans up $T
make_extents=$repo/tests/integration/make_extents.sh

G=$((1 << 30)) M=$((1 << 20))
case $mode in
  full) runs=5 warmup=1 seq_size=$((4 * G)) seq_extents=2500 sparse_size=$((64 * G)) sparse_direct_runs=1
        mix_queries=2000 mix_extents=3000 tmpfs_size=$((8 * G)) tmpfs_chunks=8192 data_size=$G mem_extents=1000000
        latency_seconds=2 micro_time=0.2 pressure_size=$((8 * G)) pressure_extents=5000 dense_size=$((4 * G))
        multi_exports=8 multi_size=$G multi_chunks=300 variance_runs=15 ;;
  quick) runs=3 warmup=1 seq_size=$((1 * G)) seq_extents=600 sparse_size=$((16 * G)) sparse_direct_runs=0
         mix_queries=500 mix_extents=1000 tmpfs_size=$((1 * G)) tmpfs_chunks=1024 data_size=$((128 * M))
         mem_extents=100000 latency_seconds=1 micro_time=0.02 pressure_size=$((8 * G)) pressure_extents=5000 dense_size=$((1 * G))
         multi_exports=8 multi_size=$((256 * M)) multi_chunks=100 variance_runs=5 ;;
  tiny) runs=1 warmup=0 seq_size=$((64 * M)) seq_extents=40 sparse_size=$((2 * G)) sparse_direct_runs=0
        mix_queries=50 mix_extents=20 tmpfs_size=$((16 * M)) tmpfs_chunks=16 data_size=$((8 * M)) mem_extents=1000
        latency_seconds=0.2 micro_time=0.001 pressure_size=$((256 * M)) pressure_extents=100 dense_size=$((16 * M))
        multi_exports=2 multi_size=$((16 * M)) multi_chunks=8 variance_runs=2 ;;
esac
delay=5ms sparse_delay=50ms
[[ $mode == tiny ]] && delay=1ms sparse_delay=2ms

raw=$out/raw.tsv
want() { [[ -z $only || $only == *",$1,"* ]]; }
section_workloads() {  # the workload names a section writes
  case $1 in
    seq) echo "seq-map convert convert-instant convert-variance two-scanners" ;;
    hit-latency) echo "hit-latency-qd1 hit-latency-qd16 hit-cost-qd1 hit-cost-qd16 hit-clients-1 hit-clients-4 hit-clients-16" ;;
    data-path) echo "data-read data-read-convert data-write" ;;
    tcp) echo "tcp-read tcp-read-convert tcp-write" ;;
    capacity-pressure) echo "capacity-pressure dense-map-cold" ;;
    tls) echo "tls-data-read tls-data-read-convert tls-data-write tls-seq-map tls-hit-latency-qd1 tls-hit-latency-qd16" ;;
    *) echo "$1" ;;
  esac
}
if [[ -n $only && -f $raw ]]; then
  # Keep the rows of the sections not being re-run.
  # (one line per section: joined with spaces, or each section's first name would be kept)
  drop=$(for sec in ${only//,/ }; do section_workloads "$sec"; done | tr '\n' ' ')
  awk -F'\t' -v drop=" $drop " 'NR == 1 || index(drop, " " $1 " ") == 0' "$raw" >"$raw.keep" && mv "$raw.keep" "$raw"
else
  printf 'workload\tcontender\tmetric\tmedian\tmin\tmax\truns\tnote\n' >"$raw"
fi
now() { date +%s.%N; }
log() { echo "[$(date +%T)] $*" >&2; }

# record WORKLOAD CONTENDER METRIC NOTE VALUES...
record() {
  local workload=$1 contender=$2 metric=$3 note=$4; shift 4
  printf '%s\n' "$@" | sort -g | awk -v w="$workload" -v c="$contender" -v m="$metric" -v note="$note" '
    { v[NR] = $1 } END { med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2;
      printf "%s\t%s\t%s\t%.6g\t%.6g\t%.6g\t%d\t%s\n", w, c, m, med, v[1], v[NR], NR, note }' >>"$raw"
  log "$workload / $contender: $(tail -1 "$raw" | cut -f4) ($metric, median of $#)"
}

# Fronts (proxies) started fresh for each run so every run starts cold.
bscache_args=()  # extra options for the bscache contender (one section sets them)
# Upstreams reached over TCP loopback (start_nbdkit_tcp): name -> port. Every
# other upstream is reached over its Unix socket $T/NAME.sock. Clients always
# reach a front over its Unix socket.
declare -A up_port=()
up_uri() {  # UPSTREAM_NAME: the URI of an upstream
  if [[ -n ${up_port[$1]:-} ]]; then echo "nbd://127.0.0.1:${up_port[$1]}"; else uri "$1"; fi
}
front_up() {  # CONTENDER UPSTREAM_NAME: sets $target, the URI clients use
  local contender=$1 up=$2
  local nbd_up=(socket="$T/$up.sock")  # the nbd plugin's way to the upstream
  [[ -z ${up_port[$up]:-} ]] || nbd_up=(hostname=127.0.0.1 port="${up_port[$up]}")
  target=$(uri front)
  case $contender in
    direct | floor) target=$(up_uri "$up") ;;
    cacheextents) start_nbdkit front --filter=cacheextents nbd "${nbd_up[@]}" ;;
    nbdkit-nbd) start_nbdkit front nbd "${nbd_up[@]}" ;;
    bscache) start_bscache front --upstream "$(up_uri "$up")" --log-level warn --stats-file "$T/front.json" \
               ${bscache_args[@]+"${bscache_args[@]}"} ;;
    bscache-libnbd) start_bscache front --upstream "$(up_uri "$up")" --log-level warn --data-path libnbd ;;
    bscache-off) start_bscache front --upstream "$(up_uri "$up")" --log-level warn --policy off \
                   --stats-file "$T/front.json" ;;
    bscache-baseline) BSCACHE=$BSCACHE_BASELINE start_bscache front --upstream "$(up_uri "$up")" --log-level warn ;;
    # The tls section: clients speak TLS; upstreams whose name ends in "tls" too.
    direct-tls) target=$(tls_target "$up") ;;
    bscache-tls)
      local up_uri; up_uri=$(up_uri "$up")
      [[ $up == *tls ]] && up_uri=$(tls_target "$up")
      start_bscache front --upstream "$up_uri" --log-level warn --tls require --tls-certificates "$pki/server"
      target=$(tls_target front) ;;
    nbdkit-nbd-tls)
      local up_tls=()
      [[ $up == *tls ]] && up_tls=(tls=require tls-certificates="$pki/client")
      start_nbdkit front --tls=require --tls-certificates="$pki/server" nbd "${nbd_up[@]}" ${up_tls[@]+"${up_tls[@]}"}
      target=$(tls_target front) ;;
  esac
}
front_down() { [[ -f $T/front.pid ]] && { stop_server front; rm -f "$T/front.pid"; }; return 0; }

# The contenders of the data-path and convert rows (with the baseline binary when given).
data_contenders() { echo "direct nbdkit-nbd $* bscache bscache-libnbd bscache-off ${BSCACHE_BASELINE:+bscache-baseline}"; }

# With track_rss=1, measure and measure_interleaved also record the peak
# resident memory of a front that is a process of its own (bscache or nbdkit's
# nbd plugin; not cacheextents, whose row is about block status).
tracks_rss() { [[ ${track_rss:-0} == 1 && ($1 == bscache* || $1 == nbdkit-nbd*) ]]; }
front_hwm_mib() { awk '/VmHWM/ { print $2 / 1024 }' "/proc/$(cat "$T/front.pid")/status"; }
rss_note="front's VmHWM after the run"
# row_note: the note of the seconds rows measure and measure_interleaved record
# (what the workload is, where the section sets it).
row_note=""

# measure WORKLOAD CONTENDER UPSTREAM RUNS CLIENT_FUNCTION [REFERENCE]
# Times CLIENT_FUNCTION URI OUTFILE, warm-up first; checks output vs REFERENCE.
measure() {
  local workload=$1 contender=$2 up=$3 n=$4 client=$5 reference=${6:-}
  local times=() rss=() i
  ((n > 0)) || return 0
  for ((i = 0; i < n + warmup; i++)); do
    local t0 t1
    front_up "$contender" "$up"
    t0=$(now)
    "$client" "$target" "$T/out.$contender"
    t1=$(now)
    if tracks_rss "$contender" && ((i >= warmup)); then rss+=("$(front_hwm_mib)"); fi
    front_down
    if [[ -n $reference ]] && ! cmp -s "$T/out.$contender" "$reference"; then
      echo "ERROR: $workload: $contender's output differs from direct's" >&2
      exit 1
    fi
    ((i >= warmup)) && times+=("$(echo "$t1 - $t0" | bc -l)")
  done
  record "$workload" "$contender" seconds "$row_note" "${times[@]}"
  ((${#rss[@]} == 0)) || record "$workload" "$contender" peak_rss_mib "$rss_note" "${rss[@]}"
}

# measure_interleaved WORKLOAD UPSTREAM RUNS CLIENT_FUNCTION CONTENDERS...
# Like measure (without a reference), but run i of every contender before run
# i+1 of any: these VMs drift by 10-20% over minutes, and interleaving shifts
# every contender alike instead of whichever ran during a slow spell. A
# contender written NAME@UPSTREAM_NAME uses that upstream instead of UPSTREAM.
measure_interleaved() {
  local workload=$1 up=$2 n=$3 client=$4; shift 4
  local -A times=() rss=()
  local i c name c_up t0 t1
  for ((i = 0; i < n + warmup; i++)); do
    for c in "$@"; do
      name=${c%@*} c_up=$up
      [[ $c != *@* ]] || c_up=${c#*@}
      front_up "$name" "$c_up"
      t0=$(now)
      "$client" "$target" "$T/out.$name"
      t1=$(now)
      if tracks_rss "$name" && ((i >= warmup)); then rss[$name]+=" $(front_hwm_mib)"; fi
      front_down
      ((i >= warmup)) && times[$name]+=" $(echo "$t1 - $t0" | bc -l)"
    done
  done
  for c in "$@"; do
    name=${c%@*}
    # shellcheck disable=SC2086 # word splitting of the collected values is wanted
    record "$workload" "$name" seconds "$row_note" ${times[$name]}
    # shellcheck disable=SC2086
    [[ -z ${rss[$name]:-} ]] || record "$workload" "$name" peak_rss_mib "$rss_note" ${rss[$name]}
  done
}

client_map() { qemu-img map -f raw --output=json "$1" >"$2"; }
client_convert() { qemu-img convert -n -f raw "$1" --target-image-opts "driver=null-co,size=$seq_size" && : >"$2"; }
# The byte rows (data-path, tcp, tls): $shm/random.img of $data_size is the data.
client_read() { nbdcopy "$1" null: && : >"$2"; }
client_read_convert() {
  qemu-img convert -n -f raw "$1" --target-image-opts "driver=null-co,size=$data_size" && : >"$2"
}
client_write() { nbdcopy --flush "$shm/random.img" "$1" && : >"$2"; }
client_two() {
  local half=$((seq_size / 2))
  qemu-img map -f raw --output=json --max-length=$half "$1" >"$2.lo" &
  qemu-img map -f raw --output=json --start-offset=$half "$1" >"$2.hi"
  wait $!
  cat "$2.lo" "$2.hi" >"$2"
}

# ---- seq-map, convert, two-scanners: 4 GiB, ~2,500 extents, 5 ms per call ----
if want seq; then
"$make_extents" "$seq_size" "$seq_extents" 42 >"$T/seq.ext"
start_nbdkit seqslow --filter=delay --filter=extentlist null size=$seq_size extentlist="$T/seq.ext" delay-extents=$delay
start_nbdkit seqfast --filter=extentlist null size=$seq_size extentlist="$T/seq.ext"
client_map "$(uri seqfast)" "$T/seq.ref"
client_two "$(uri seqfast)" "$T/two.ref"
for c in direct cacheextents bscache bscache-off; do measure seq-map $c seqslow $runs client_map "$T/seq.ref"; done
measure seq-map floor seqfast $runs client_map "$T/seq.ref"
for c in $(data_contenders cacheextents); do measure convert $c seqslow $runs client_convert; done
measure convert floor seqfast $runs client_convert
for c in $(data_contenders cacheextents); do measure convert-instant $c seqfast $runs client_convert; done
# convert-variance: how far one workload's runs spread on this machine (median,
# min and max of many interleaved runs, a fresh front each).
row_note="$variance_runs interleaved runs, fresh front each"
measure_interleaved convert-variance seqfast "$variance_runs" client_convert direct bscache
row_note=""
for c in direct cacheextents bscache; do measure two-scanners $c seqslow $runs client_two "$T/two.ref"; done
measure two-scanners floor seqfast $runs client_two "$T/two.ref"
fi

# ---- big-sparse: 1 MiB of data every 64 MiB, 50 ms per call ----
if want big-sparse; then
awk -v n=$((sparse_size / (64 * M))) 'BEGIN { for (i = 0; i < n; i++) {
  printf "%.0f 1048576\n%.0f 66060288 hole,zero\n", i * 67108864, i * 67108864 + 1048576 } }' >"$T/sparse.ext"
start_nbdkit sparseslow --filter=delay --filter=extentlist null size=$sparse_size extentlist="$T/sparse.ext" \
  delay-extents=$sparse_delay
start_nbdkit sparsefast --filter=extentlist null size=$sparse_size extentlist="$T/sparse.ext"
client_map "$(uri sparsefast)" "$T/sparse.ref"
for c in cacheextents bscache; do measure big-sparse $c sparseslow $runs client_map "$T/sparse.ref"; done
measure big-sparse floor sparsefast $runs client_map "$T/sparse.ref"
saved_warmup=$warmup warmup=0
measure big-sparse direct sparseslow $sparse_direct_runs client_map "$T/sparse.ref"
warmup=$saved_warmup
fi

# ---- write-mix: REQ_ONE walk with a 4 KiB write every 10 queries ----
# A fresh memory upstream per run (writes change it); the stats filter counts
# what reached upstream, so every contender's hit rate is measured the same way.
mix_run() {  # CONTENDER -> "seconds hit_rate"
  local contender=$1 calls
  start_nbdkit mix --filter=stats --filter=delay memory $seq_size delay-extents=$delay statsfile="$T/mix.stats"
  "$tools/write_mix" "$(uri mix)" --populate $mix_extents
  front_up "$contender" mix
  read -r secs _ _ < <("$tools/write_mix" "$target" $mix_queries)
  front_down
  stop_server mix
  rm -f "$T/mix.pid"
  calls=$(stats_count "$T/mix.stats" extents)
  echo "$secs $(echo "1 - $calls / $mix_queries" | bc -l)"
}
want write-mix && for c in direct cacheextents bscache; do
  secs=() rates=()
  for ((i = 0; i < runs; i++)); do read -r s r < <(mix_run $c); secs+=("$s"); rates+=("$r"); done
  record write-mix $c seconds "" "${secs[@]}"
  record write-mix $c hit_rate "1 - upstream calls / queries" "${rates[@]}"
done

# ---- incremental-backup: qemu-img map over a dirty bitmap (qemu-nbd -B), 5 ms per request ----
# A backup tool's view of what changed: qemu's REQ_ONE walk of
# qemu:dirty-bitmap:bm0 on a 4 GiB qcow2 with ~2,500 dirty extents (in
# --quick mode too: the row is about that shape). qemu-nbd has no delay
# filter: tests/integration/delay_relay.py sits in front of it and hands
# every request on 5 ms after it came.
client_backup_map() {
  qemu-img map --output=json --image-opts "driver=nbd,server.type=unix,server.path=${1#*socket=},x-dirty-bitmap=qemu:dirty-bitmap:bm0" >"$2"
}
if want incremental-backup; then
backup_size=$((4 * G)) backup_extents=2500 backup_delay=0.005
[[ $mode == tiny ]] && backup_size=$((64 * M)) backup_extents=40 backup_delay=0.001
backup=$T/backup.qcow2
qemu-img create -q -f qcow2 "$backup.base" $backup_size
qemu-img create -q -f qcow2 -b "$backup.base" -F qcow2 "$backup"
qemu-img bitmap --add "$backup" bm0
backup_writes=()
for ((i = 0; i < backup_extents; i++)); do
  backup_writes+=(-c "write -P 7 $((i * (backup_size / backup_extents / 65536 * 65536) + 65536)) 64k")
done
qemu-io -f qcow2 "${backup_writes[@]}" "$backup" >/dev/null
rm -f "$T/backupfast.sock" "$T/backupfast.pid" "$T/backupslow.sock" "$T/backupslow.pid"
qemu-nbd -t -r -e 8 -f qcow2 -B bm0 -k "$T/backupfast.sock" --pid-file="$T/backupfast.pid" "$backup" \
  >"$T/backupfast.log" 2>&1 &
PIDS+=($!)
wait_for_file "$T/backupfast.pid"
/usr/bin/python3 "$repo/tests/integration/delay_relay.py" "$T/backupslow.sock" "$T/backupfast.sock" \
  --delay $backup_delay --pidfile "$T/backupslow.pid" >"$T/backupslow.log" 2>&1 &
PIDS+=($!)
wait_for_file "$T/backupslow.pid"
client_backup_map "$(uri backupfast)" "$T/backup.ref"
for c in direct bscache bscache-off; do measure incremental-backup $c backupslow $runs client_backup_map "$T/backup.ref"; done
measure incremental-backup floor backupfast $runs client_backup_map "$T/backup.ref"
# The hit rate and upstream calls of one more cold bscache run.
front_up bscache backupslow
client_backup_map "$target" "$T/out.backup"
front_down
record incremental-backup bscache hit_rate "hits / block-status queries" "$(jq '.block_status.hit_rate' "$T/front.json")"
record incremental-backup bscache upstream_calls "block-status calls upstream for the whole walk" \
  "$(jq '.upstream.requests.block_status' "$T/front.json")"
record incremental-backup bscache client_queries "REQ_ONE queries qemu-img sent" \
  "$(jq '.client.requests.block_status' "$T/front.json")"
fi

# ---- tmpfs: qemu-nbd on a sparse file in /dev/shm, no delay ----
if want tmpfs; then
shm=$(mktemp -d /dev/shm/bscache-bench.XXXXXX)
/usr/bin/python3 - "$shm/disk.img" "$tmpfs_size" "$tmpfs_chunks" <<'PY'
import sys
path, size, chunks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "wb") as f:
    f.truncate(size)
    for i in range(chunks):
        f.seek(size // chunks * i)
        f.write(b"\xa5" * 4096)
PY
qemu-nbd -f raw -t -k "$T/tmpfs.sock" --pid-file "$T/tmpfs.pid" --fork "$shm/disk.img"
PIDS+=("$(cat "$T/tmpfs.pid")")
client_map "$(uri tmpfs)" "$T/tmpfs.ref"
for c in direct cacheextents bscache; do measure tmpfs $c tmpfs $runs client_map "$T/tmpfs.ref"; done
kill "$(cat "$T/tmpfs.pid")"
rm -rf "$shm"
fi

# ---- hit-latency: REQ_ONE on cached ranges, queue depth 1 and 16 ----
# Also what answering costs the server: CPU of all its threads and system calls (perf's raw_syscalls tracepoint, where perf
# can count it) per request, bscache against nbdkit answering the same
# queries from its own extent list ("direct"); and hits per second for 1, 4
# and 16 clients at queue depth 1 each.
server_pid() { if [[ $1 == direct ]]; then cat "$T/seqfast.pid"; else cat "$T/front.pid"; fi; }
# CPU of the whole process, threads that ended included (nbdkit's connection
# threads do), in microseconds; /proc counts it in clock ticks.
cpu_us() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.0f\n", ($14 + $15) * 1e6 / hz }' /proc/"$1"/stat; }
can_count_syscalls() { perf stat -x, -e raw_syscalls:sys_enter -- true >/dev/null 2>&1; }
# hit_cost CONTENDER DEPTH CLIENTS: one measured pass (after a warming one);
# prints "requests_per_second microseconds cpu_us_per_request syscalls_per_request".
hit_cost() {
  local c=$1 depth=$2 clients=$3 pid cpu0 cpu1 perf_pid="" total=0 lat=0 rate lat_i k
  front_up "$c" seqfast
  pid=$(server_pid "$c")
  "$tools/hit_latency" "$target" "$seq_size" "$latency_seconds" "$depth" >/dev/null  # warm the cache
  if can_count_syscalls; then
    perf stat -x, -o "$T/syscalls.csv" -e raw_syscalls:sys_enter -p "$pid" & perf_pid=$!
    sleep 0.3  # perf attaches
  fi
  cpu0=$(cpu_us "$pid")
  local client_pids=()
  for ((k = 0; k < clients; k++)); do
    "$tools/hit_latency" "$target" "$seq_size" "$latency_seconds" "$depth" >"$T/hits.$k" & client_pids+=($!)
  done
  wait "${client_pids[@]}"
  cpu1=$(cpu_us "$pid")
  local syscalls=nan
  if [[ -n $perf_pid ]]; then
    kill -INT "$perf_pid"; wait "$perf_pid" || true
    syscalls=$(awk -F, '$3 ~ /raw_syscalls/ { print $1 }' "$T/syscalls.csv")
  fi
  for ((k = 0; k < clients; k++)); do
    read -r rate lat_i <"$T/hits.$k"
    total=$(awk -v a="$total" -v b="$rate" 'BEGIN { print a + b }')
    lat=$lat_i
  done
  front_down
  # hit_latency prints rates; the count is rate x its duration.
  awk -v r="$total" -v l="$lat" -v s="$latency_seconds" -v c0="$cpu0" -v c1="$cpu1" -v n="$syscalls" 'BEGIN {
    q = r * s; printf "%.0f %s %.3f %s\n", r, l, (c1 - c0) / q, (n == "nan" ? "nan" : sprintf("%.3f", n / q)) }'
}
if want hit-latency && [[ ! -S $T/seqfast.sock ]]; then  # run without the seq section
  "$make_extents" "$seq_size" "$seq_extents" 42 >"$T/seq.ext"
  start_nbdkit seqfast --filter=extentlist null size=$seq_size extentlist="$T/seq.ext"
fi
want hit-latency && for depth in 1 16; do
  for c in direct cacheextents bscache; do
    rates=() lats=() cpus=() calls=()
    for ((i = 0; i < runs; i++)); do
      read -r rate lat cpu sc < <(hit_cost $c $depth 1)
      rates+=("$rate") lats+=("$lat") cpus+=("$cpu") calls+=("$sc")
    done
    record "hit-latency-qd$depth" $c requests_per_second "" "${rates[@]}"
    record "hit-latency-qd$depth" $c microseconds "" "${lats[@]}"
    [[ $c == cacheextents ]] && continue  # its CPU is nbdkit's twice over, nothing to compare
    record "hit-cost-qd$depth" $c cpu_microseconds_per_request "server's threads" "${cpus[@]}"
    [[ ${calls[0]} != nan ]] && record "hit-cost-qd$depth" $c syscalls_per_request "" "${calls[@]}"
  done
done
want hit-latency && for clients in 1 4 16; do
  for c in direct bscache; do
    rates=()
    for ((i = 0; i < runs; i++)); do read -r rate _ < <(hit_cost $c 1 "$clients"); rates+=("$rate"); done
    record "hit-clients-$clients" $c requests_per_second "queue depth 1 each" "${rates[@]}"
  done
done

# ---- multi-export: N exports of one upstream (nbdkit file dir=), 5 ms per call ----
# qemu-img map of every export in turn: direct; cacheextents, one nbdkit per
# export (it serves one export each); one bscache for all of them (and its RSS).
if want multi-export; then
mshm=$(mktemp -d /dev/shm/bscache-bench.XXXXXX)
for ((e = 1; e <= multi_exports; e++)); do
  /usr/bin/python3 - "$mshm/disk$e.img" "$multi_size" "$multi_chunks" "$e" <<'PY'
import random, sys
path, size, chunks, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
with open(path, "wb") as f:
    f.truncate(size)
    for i in range(chunks):  # one 4 KiB run of data somewhere in every slice: ~2 extents per chunk
        f.seek(size // chunks * i + rng.randrange(size // chunks // 4096) * 4096)
        f.write(b"\x5a" * 4096)
PY
done
start_nbdkit multislow --filter=delay file dir="$mshm" delay-extents=$delay
start_nbdkit multifast file dir="$mshm"
export_of() { echo "nbd+unix:///disk$2.img?socket=$T/$1.sock"; }
for ((e = 1; e <= multi_exports; e++)); do client_map "$(export_of multifast $e)" "$T/multi.ref.$e"; done
for c in direct cacheextents bscache; do
  times=() rss=()
  for ((i = 0; i < runs + warmup; i++)); do
    case $c in
      bscache) start_bscache front --upstream "$(uri multislow)" --log-level warn ;;
      cacheextents) for ((e = 1; e <= multi_exports; e++)); do
          start_nbdkit "front$e" --filter=cacheextents nbd socket="$T/multislow.sock" export="disk$e.img"
        done ;;
    esac
    t0=$(now)
    for ((e = 1; e <= multi_exports; e++)); do
      case $c in
        direct) target=$(export_of multislow $e) ;;
        cacheextents) target=$(uri "front$e") ;;
        bscache) target=$(export_of front $e) ;;
      esac
      client_map "$target" "$T/multi.out.$e"
    done
    t1=$(now)
    if [[ $c == bscache ]] && ((i >= warmup)); then
      rss+=("$(awk '/VmHWM/ { print $2 / 1024 }' "/proc/$(cat "$T/front.pid")/status")")
    fi
    front_down
    if [[ $c == cacheextents ]]; then
      for ((e = 1; e <= multi_exports; e++)); do stop_server "front$e"; rm -f "$T/front$e.pid"; done
    fi
    for ((e = 1; e <= multi_exports; e++)); do
      cmp -s "$T/multi.out.$e" "$T/multi.ref.$e" || { echo "ERROR: multi-export: $c's map of disk$e differs" >&2; exit 1; }
    done
    ((i >= warmup)) && times+=("$(echo "$t1 - $t0" | bc -l)")
  done
  record multi-export $c seconds "$multi_exports exports of $((multi_size / M)) MiB" "${times[@]}"
  ((${#rss[@]} == 0)) || record multi-export $c peak_rss_mib "bscache's VmHWM after mapping every export" "${rss[@]}"
done
rm -rf "$mshm"
fi

# ---- data-path: bytes through each contender (upstream: nbdkit file on /dev/shm) ----
if want data-path; then
shm=$(mktemp -d /dev/shm/bscache-bench.XXXXXX)
head -c "$data_size" /dev/urandom >"$shm/random.img"
cp "$shm/random.img" "$shm/target.img"
start_nbdkit data file "$shm/random.img"
start_nbdkit target file "$shm/target.img"
track_rss=1
# shellcheck disable=SC2046 # one word per contender
measure_interleaved data-read data $runs client_read $(data_contenders)
# shellcheck disable=SC2046
measure_interleaved data-read-convert data $runs client_read_convert $(data_contenders)
# shellcheck disable=SC2046
measure_interleaved data-write target $runs client_write $(data_contenders)
track_rss=0
cmp -s "$shm/target.img" "$shm/random.img" || { echo "ERROR: data-path wrote wrong bytes" >&2; exit 1; }
rm -rf "$shm"
fi

# ---- tcp: bytes through each contender, upstream over TCP loopback ----
# As data-path, but the upstreams listen on 127.0.0.1 (bscache splices from and
# into TCP sockets then); clients reach the fronts over their Unix sockets,
# "direct" reaches upstream over TCP.
free_port() {
  /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# start_nbdkit_tcp NAME PORT ARGS...: nbdkit on 127.0.0.1:PORT, ready on return;
# front_up reaches upstream NAME there from now on.
start_nbdkit_tcp() {
  local name=$1 port=$2; shift 2
  rm -f "$T/$name.pid"
  nbdkit -f -i 127.0.0.1 -p "$port" -P "$T/$name.pid" "$@" >"$T/$name.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1200); do
    [[ -s $T/$name.pid ]] && { up_port[$name]=$port; return 0; }
    kill -0 "${PIDS[-1]}" 2>/dev/null || break  # the port was taken, say
    sleep 0.05
  done
  echo "ERROR: nbdkit $name did not start on port $port: $(cat "$T/$name.log")" >&2
  exit 1
}
tcp_contenders() { echo "direct nbdkit-nbd bscache bscache-off ${BSCACHE_BASELINE:+bscache-baseline}"; }
if want tcp; then
shm=$(mktemp -d /dev/shm/bscache-bench.XXXXXX)
head -c "$data_size" /dev/urandom >"$shm/random.img"
cp "$shm/random.img" "$shm/target.img"
start_nbdkit_tcp tcpdata "$(free_port)" file "$shm/random.img"
start_nbdkit_tcp tcptarget "$(free_port)" file "$shm/target.img"
track_rss=1 row_note="upstream over TCP loopback"
# shellcheck disable=SC2046 # one word per contender
measure_interleaved tcp-read tcpdata $runs client_read $(tcp_contenders)
# shellcheck disable=SC2046
measure_interleaved tcp-read-convert tcpdata $runs client_read_convert $(tcp_contenders)
# shellcheck disable=SC2046
measure_interleaved tcp-write tcptarget $runs client_write $(tcp_contenders)
track_rss=0 row_note=""
cmp -s "$shm/target.img" "$shm/random.img" || { echo "ERROR: tcp wrote wrong bytes" >&2; exit 1; }
rm -rf "$shm"
fi

# ---- tls: data and the cache's hit path over TLS (X.509, both sides) ----
# Contenders: direct-tls (client to a TLS nbdkit), bscache-tls (TLS to the
# client and to upstream), and the same two in plain text for reference. The
# question is what TLS costs bscache, not TLS itself: bscache-tls/bscache. In
# the data rows also nbdkit-nbd-tls: nbdkit's nbd plugin with TLS on both sides.
if want tls; then
pki=$T/pki
bash "$repo/tests/integration/tls_pki.sh" "$pki"
tls_target() { echo "nbds+unix:///?socket=$T/$1.sock&tls-certificates=$pki/client"; }
# qemu has no nbds:// URIs: a tls-creds object and image options instead.
qemu_tls_map() {
  local sock=${1#*socket=}
  sock=${sock%%&*}
  qemu-img map --output=json --object "tls-creds-x509,id=tls0,dir=$pki/client,endpoint=client" --image-opts \
    "driver=nbd,server.type=unix,server.path=$sock,tls-creds=tls0,tls-hostname=localhost" >"$2"
}
client_any_map() { if [[ $1 == nbds* ]]; then qemu_tls_map "$@"; else client_map "$@"; fi; }
qemu_tls_convert() {
  local sock=${1#*socket=}
  sock=${sock%%&*}
  qemu-img convert -n --object "tls-creds-x509,id=tls0,dir=$pki/client,endpoint=client" --image-opts \
    "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=$sock,file.tls-creds=tls0,file.tls-hostname=localhost" \
    --target-image-opts "driver=null-co,size=$data_size" && : >"$2"
}
client_any_read_convert() { if [[ $1 == nbds* ]]; then qemu_tls_convert "$@"; else client_read_convert "$@"; fi; }
shm=$(mktemp -d /dev/shm/bscache-bench.XXXXXX)
head -c "$data_size" /dev/urandom >"$shm/random.img"
cp "$shm/random.img" "$shm/target.img"
start_nbdkit tlsdata file "$shm/random.img"
start_nbdkit tlsdatatls --tls=require --tls-certificates="$pki/server" file "$shm/random.img"
start_nbdkit tlstarget file "$shm/target.img"
start_nbdkit tlstargettls --tls=require --tls-certificates="$pki/server" file "$shm/target.img"
track_rss=1
measure tls-data-read direct tlsdata $runs client_read
measure tls-data-read direct-tls tlsdatatls $runs client_read
measure tls-data-read bscache tlsdata $runs client_read
measure tls-data-read bscache-tls tlsdatatls $runs client_read
measure tls-data-read nbdkit-nbd-tls tlsdatatls $runs client_read
measure_interleaved tls-data-read-convert tlsdatatls $runs client_any_read_convert \
  direct@tlsdata bscache@tlsdata direct-tls nbdkit-nbd-tls bscache-tls
measure_interleaved tls-data-write tlstargettls $runs client_write \
  direct@tlstarget bscache@tlstarget direct-tls nbdkit-nbd-tls bscache-tls
track_rss=0
cmp -s "$shm/target.img" "$shm/random.img" || { echo "ERROR: tls wrote wrong bytes" >&2; exit 1; }
rm -rf "$shm"
"$make_extents" "$seq_size" "$seq_extents" 42 >"$T/tlsseq.ext"
start_nbdkit tlsseq --filter=delay --filter=extentlist null size=$seq_size extentlist="$T/tlsseq.ext" \
  delay-extents=$delay
start_nbdkit tlsseqtls --tls=require --tls-certificates="$pki/server" --filter=delay --filter=extentlist null \
  size=$seq_size extentlist="$T/tlsseq.ext" delay-extents=$delay
start_nbdkit tlsseqfast --filter=extentlist null size=$seq_size extentlist="$T/tlsseq.ext"
client_map "$(uri tlsseq)" "$T/tlsseq.ref"
for c in direct bscache; do measure tls-seq-map $c tlsseq $runs client_any_map "$T/tlsseq.ref"; done
for c in direct-tls bscache-tls; do measure tls-seq-map $c tlsseqtls $runs client_any_map "$T/tlsseq.ref"; done
for depth in 1 16; do
  for c in bscache bscache-tls; do
    rates=() lats=()
    for ((i = 0; i < runs; i++)); do
      front_up $c tlsseqfast
      "$tools/hit_latency" "$target" "$seq_size" "$latency_seconds" $depth >/dev/null  # warm the cache
      read -r rate lat < <("$tools/hit_latency" "$target" "$seq_size" "$latency_seconds" $depth)
      front_down
      rates+=("$rate") lats+=("$lat")
    done
    record "tls-hit-latency-qd$depth" $c requests_per_second "" "${rates[@]}"
    record "tls-hit-latency-qd$depth" $c microseconds "" "${lats[@]}"
  done
done
fi

# ---- memory: bytes per cached extent ----
if want memory; then
seq 0 $((mem_extents - 1)) | awk '{ printf "%.0f 4096 %s\n", $1 * 4096, ($1 % 2) ? "hole,zero" : "" }' >"$T/mem.ext"
start_nbdkit mem --filter=extentlist null size=$((mem_extents * 4096)) extentlist="$T/mem.ext"
start_bscache memb --upstream "$(uri mem)" --log-level warn --cache-max-extents $((2 * mem_extents)) \
  --stats-file "$T/mem.json"
pid=$(cat "$T/memb.pid")
rss_before=$(awk '/VmRSS/ { print $2 * 1024 }' "/proc/$pid/status")
/usr/bin/python3 - "$(uri memb)" $((mem_extents * 4096)) <<'PY'
import sys, nbd
h = nbd.NBD(); h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION); h.connect_uri(sys.argv[1])
size, pos = int(sys.argv[2]), 0
def cb(ctx, off, entries, err):
    global pos
    pos = off + sum(entries[0::2])
    return 0
while pos < size:
    h.block_status(min(size - pos, 1 << 31), pos, cb)
PY
rss_after=$(awk '/VmRSS/ { print $2 * 1024 }' "/proc/$pid/status")
kill -USR1 "$pid"
sleep 0.5
extents=$(jq .cache.extents "$T/mem.json")
estimate=$(jq .cache.memory_bytes "$T/mem.json")
record memory bscache rss_bytes_per_extent "RSS growth / cached extents ($extents)" \
  "$(echo "($rss_after - $rss_before) / $extents" | bc -l)"
record memory bscache estimated_bytes_per_extent "cache.memory_bytes / extents" "$(echo "$estimate / $extents" | bc -l)"
stop_server memb
fi

# ---- capacity-pressure: a cache far too small for the disk must not cost more than no cache ----
# qemu-img map of 8 GiB with 5,000 extents through a 16-extent cache, against
# an instant upstream: nothing to gain, so the target is direct's time.
if want capacity-pressure; then
"$make_extents" "$pressure_size" "$pressure_extents" 42 >"$T/pressure.ext"
start_nbdkit pressure --filter=extentlist null size=$pressure_size extentlist="$T/pressure.ext"
client_map "$(uri pressure)" "$T/pressure.ref"
measure capacity-pressure direct pressure $runs client_map "$T/pressure.ref"
bscache_args=(--cache-max-extents 16)
measure capacity-pressure bscache pressure $runs client_map "$T/pressure.ref"
bscache_args=()
stop_server pressure

# dense-map-cold: one cold non-REQ_ONE map (nbdinfo --map) of a disk made of
# 4 KiB extents (1,048,576 of them in the full run), default cache limit: a
# fresh bscache must not be slower than direct (it used to split the query
# into windows: 13.1 s against 4.2 s).
awk -v n=$((dense_size / 4096)) 'BEGIN { for (i = 0; i < n; i++) printf "%.0f 4096 %s\n", i * 4096, (i % 2) ? "hole,zero" : "" }' \
  >"$T/dense.ext"
start_nbdkit dense --filter=extentlist null size=$dense_size extentlist="$T/dense.ext"
client_nbdinfo_map() { nbdinfo --map "$1" >"$2"; }
client_nbdinfo_map "$(uri dense)" "$T/dense.ref"
measure dense-map-cold direct dense $runs client_nbdinfo_map "$T/dense.ref"
measure dense-map-cold bscache dense $runs client_nbdinfo_map "$T/dense.ref"
stop_server dense
fi

# ---- cache micro-benchmarks ----
if want micro && [[ -x $tools/cache_micro ]]; then
  "$tools/cache_micro" --benchmark_min_time=$micro_time >"$out/micro.txt" 2>/dev/null || true
fi

/usr/bin/python3 "$here/report.py" "$raw" "$out" "$mode"
log "wrote $out/RESULTS.md"
