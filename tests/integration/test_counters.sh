#!/usr/bin/env bash
# Every counter in README's "Statistics and metrics" moves, by exactly what the
# action behind it implies, in the stats file (SIGUSR1) and in /metrics:
# requests and errors per op (invalid, failed upstream, refused at shutdown),
# upstream requests/errors/connections/reconnects/latency, hits and misses,
# connection limits, evictions, TTL expirations, prefetches, cache brackets,
# the cache limit in force, bypassed misses, and calls saved going negative.
# The servers are started here; counters.py drives clients and checks.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
py=/usr/bin/python3
# --exports single: the export opens at start-up, so "at start" counts its upstream connections.
common=(--metrics 127.0.0.1:0 --stats-interval 0 --exports single)
start_proxy() {  # NAME UPSTREAM ARGS...: bscache with a stats file NAME.json and a metrics endpoint
  local name=$1 up=$2; shift 2
  start_bscache "$name" --upstream "$(uri "$up")" --stats-file "$T/$name.json" "${common[@]}" "$@"
}

# A: memory behind the error filter, which fails every op (but FLUSH: no hook in
# nbdkit 1.32) while $T/fail exists. The filter keeps memory's multi-conn: 4 connections.
start_nbdkit upa --filter=error memory 64M error=EIO error-rate=100% error-file="$T/fail"
start_proxy a upa --prefetch off

# B: a python plugin whose FLUSH fails; no can_multi_conn, so one upstream connection.
cat >"$T/flush_fails.py" <<'PY'
import errno
import nbdkit

API_VERSION = 2
disk = bytearray(16 << 20)


def open(readonly):
    return 1


def get_size(h):
    return len(disk)


def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    disk[offset:offset + len(buf)] = buf


def can_flush(h):
    return True


def flush(h, flags):
    nbdkit.set_error(errno.EIO)
    raise RuntimeError("injected flush failure")
PY
start_nbdkit upb python "$T/flush_fails.py"
start_proxy b upb --prefetch off

# C: --max-connections 1; counters.py kills this upstream (-9) and restarts it.
start_nbdkit upc memory 64M
start_proxy c upc --prefetch off --max-connections 1

# D and E: 4 GiB of 256 MiB extents, data and hole,zero in turn (4 in every GiB).
for ((gib = 0; gib < 4; gib++)); do
  base=$((gib << 30)) quarter=$((1 << 28))
  printf '%d %d\n%d %d hole,zero\n%d %d\n%d %d hole,zero\n' "$base" "$quarter" $((base + quarter)) "$quarter" \
    $((base + 2 * quarter)) "$quarter" $((base + 3 * quarter)) "$quarter"
done >"$T/extents"
start_nbdkit upd --filter=extentlist null size=4G extentlist="$T/extents"
# D: 8 extents, depth 0: windows of 8 / 2 = 4 extents; the first one asked is 2 GiB (8 extents).
start_proxy d upd --prefetch off --fetch-window $((2 << 30)) --cache-max-extents 8
# E: the default limit; a fetch window of 1 GiB (4 extents): each stored window expires by its own stamp.
start_proxy e upd --prefetch off --fetch-window $((1 << 30)) --policy ttl=1s

# L: the limit in force, from --cache-max-memory, --cache-max-extents, the smaller of both;
# under 4 extents (x3) misses are forwarded unchanged, at 4 (x4) they are not.
start_proxy m upd --cache-max-memory 1M
start_proxy mx upd --cache-max-memory 1M --cache-max-extents 6000
start_proxy x3 upd --cache-max-memory 1M --cache-max-extents 3
start_proxy x4 upd --cache-max-extents 4

# N: an upstream that refuses block-status requests longer than 1 MiB (one connection).
cat >"$T/short_windows.py" <<'PY'
import errno
import nbdkit

API_VERSION = 2


def open(readonly):
    return 1


def get_size(h):
    return 16 << 20


def pread(h, buf, offset, flags):
    buf[:] = bytes(len(buf))


def can_extents(h):
    return True


def extents(h, count, offset, flags):
    if count > 1 << 20:
        nbdkit.set_error(errno.EINVAL)
        raise RuntimeError("injected: block status longer than 1 MiB refused")
    return [(offset, count, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)]
PY
start_nbdkit upn python "$T/short_windows.py"
start_proxy n upn --prefetch off

# F: prefetch on; two 256 MiB windows.
start_nbdkit upf null size=512M
start_proxy f upf --fetch-window $((256 << 20))

# G: reads take 4 s upstream, so one is in flight when SIGTERM arrives.
start_nbdkit upg --filter=delay memory 64M delay-read=4
start_proxy g upg --prefetch off

rc=0
$py "$here/counters.py" "$T" "$here/../../README.md" || rc=$?
[[ -f $T/upc2.pid ]] && PIDS+=("$(cat "$T/upc2.pid")")  # the restarted upstream of C
((rc == 0)) || fail "counters (see FAIL lines above)"
pass "every README counter and metric moves as its action implies"
