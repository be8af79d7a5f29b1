#!/usr/bin/env bash
# Command line: --run captive mode, --help/--version, bad options and an
# unreachable upstream fail fast with one clear message.
source "$(dirname "$0")/lib.sh"

start_nbdkit up memory 16M

# --run: exit status and environment.
"$BSCACHE" --upstream "$(uri up)" --run 'test -n "$uri" && test "$uri" = "$nbd" && test -S "$unixsocket" && exit 7' \
  2>"$T/run.log" && rc=0 || rc=$?
((rc == 7)) || fail "--run should exit with the command's status 7, got $rc"
"$BSCACHE" --upstream "$(uri up)" --run 'qemu-img map --output=json "$uri"' >"$T/run.map" 2>"$T/run.log" \
  || fail "--run qemu-img map failed"
jq -e '.[0].length == 16777216' "$T/run.map" >/dev/null || fail "--run map output wrong"
"$BSCACHE" --upstream "$(uri up)" --port 0 --run 'nbdinfo --size "nbd://127.0.0.1:$port"' >"$T/size" 2>"$T/run.log" \
  || fail "--run over TCP failed"
[[ $(cat "$T/size") == 16777216 ]] || fail "--port 0 with --run: wrong size"
pass "--run exit status, \$uri/\$nbd/\$unixsocket/\$port"

# --upstream-command: systemd socket activation of a child server.
"$BSCACHE" --upstream-command 'nbdkit memory 3M' --run 'nbdinfo --size "$uri"' >"$T/size" 2>"$T/run.log" \
  || fail "--upstream-command failed"
[[ $(cat "$T/size") == 3145728 ]] || fail "--upstream-command: wrong size $(cat "$T/size")"
pass "--upstream-command"

# --upstream-command with a multi-conn upstream: every upstream connection
# must reach the same server. bscache 9e20cf2 let libnbd start one server per
# connection (four RAM disks behind one export): nbdcopy's bytes written
# through one connection were read back from another disk, and differed.
head -c $((8 << 20)) /dev/urandom >"$T/random.img"
"$BSCACHE" --upstream-command 'nbdkit memory 8M' --upstream-connections 4 --run \
  "nbdcopy '$T/random.img' \"\$uri\" && nbdcopy \"\$uri\" '$T/back.img' &&
   pgrep -P \$PPID -f '^nbdkit memory 8M' >'$T/servers'" >"$T/ucmd.log" 2>&1 \
  || fail "--upstream-command with nbdcopy failed: $(tail -3 "$T/ucmd.log")"
cmp -s "$T/random.img" "$T/back.img" || fail "--upstream-command: bytes read back differ from those written"
# bscache's own children only ($PPID of the --run command): the sanitizer
# passes run this test beside other passes, with servers of their own.
[[ $(wc -l <"$T/servers") == 1 ]] || fail "--upstream-command started $(wc -l <"$T/servers") servers, want 1"
kill -0 "$(cat "$T/servers")" 2>/dev/null && fail "--upstream-command: the server outlived bscache"
pass "--upstream-command: one server for every upstream connection, bytes read back equal, server stopped at exit"

# To a file, not piped into grep -q: the help is longer than one stdio buffer,
# and bscache would die of SIGPIPE once grep stops reading at its first match.
"$BSCACHE" --help >"$T/help" || fail "--help exit status"
grep -q -- '--upstream' "$T/help" || fail "--help"
"$BSCACHE" --version | grep -q '^bscache [0-9]' || fail "--version"

expect_error() {
  local pattern=$1; shift
  local rc=0
  timeout 20 "$BSCACHE" "$@" >"$T/err.out" 2>&1 || rc=$?
  ((rc != 0)) || fail "bscache $* should fail"
  ((rc != 124)) || fail "bscache $* hung"
  grep -qi -- "$pattern" "$T/err.out" || { cat "$T/err.out"; fail "bscache $*: no message matching '$pattern'"; }
}
expect_error "unrecognised option" --upstream "$(uri up)" --unix "$T/x.sock" --frobnicate
expect_error "exactly one of" --unix "$T/x.sock"
expect_error "nothing to listen on" --upstream "$(uri up)"
expect_error "policy" --upstream "$(uri up)" --unix "$T/x.sock" --policy sometimes
expect_error "policy" --upstream "$(uri up)" --unix "$T/x.sock" --policy ttl=0s
expect_error "prefetch" --upstream "$(uri up)" --unix "$T/x.sock" --prefetch maybe
expect_error "connecting to upstream" --upstream "nbd+unix:///?socket=$T/nobody.sock" --unix "$T/x.sock"
expect_error "log-level" --upstream "$(uri up)" --unix "$T/x.sock" --log-level loud
expect_error "cache-max-memory" --upstream "$(uri up)" --unix "$T/x.sock" --cache-max-memory 12X
expect_error "cache-max-extents" --upstream "$(uri up)" --unix "$T/x.sock" --cache-max-extents 0
pass "bad options and unreachable upstream fail fast"

# Out-of-range values: exit 2, one line naming the option, nothing started.
expect_refused() {
  local option=$1; shift
  local rc=0
  timeout 20 "$BSCACHE" --upstream "$(uri up)" --unix "$T/x.sock" "$@" >"$T/err.out" 2>&1 || rc=$?
  ((rc == 2)) || { cat "$T/err.out"; fail "bscache $* should exit 2, got $rc"; }
  grep -q -- "^bscache: $option " "$T/err.out" || { cat "$T/err.out"; fail "bscache $*: message does not name $option"; }
  [[ ! -e $T/x.sock ]] || fail "bscache $* listened before refusing"
}
expect_refused --cache-max-extents --cache-max-extents=-5
expect_refused --cache-max-extents --cache-max-extents 0
expect_refused --cache-max-extents --cache-max-extents 18446744073709551621
expect_refused --fetch-window --fetch-window 4096
expect_refused --fetch-window --fetch-window 18446744073709551616
expect_refused --max-in-flight --max-in-flight 0
expect_refused --max-in-flight --max-in-flight=-1
expect_refused --max-connections --max-connections 0
expect_refused --max-connections --max-connections 4294967297
expect_refused --allocation-granularity --allocation-granularity 0
expect_refused --port --port 65536
expect_refused --port --port=-1
expect_refused --socket-mode --socket-mode 0999
expect_refused --handshake-timeout --handshake-timeout 0
expect_refused --stats-interval --stats-interval 5x
expect_refused --stats-interval --stats-interval 1000h
expect_refused --upstream-timeout --upstream-timeout=-1s
expect_refused --reconnect --reconnect maybe
pass "out-of-range values refused with exit 2 naming the option"

# The smallest accepted values work.
"$BSCACHE" --upstream "$(uri up)" --fetch-window 65536 --cache-max-extents 1 --max-in-flight 1 --max-connections 1 \
  --allocation-granularity 1 --handshake-timeout 1s --stats-interval 0 --upstream-timeout 0 \
  --run 'qemu-img map --output=json "$uri"' >"$T/small.map" 2>"$T/run.log" || fail "smallest values refused"
jq -e '.[0].length == 16777216' "$T/small.map" >/dev/null || fail "map with the smallest values wrong"
pass "smallest accepted values work"

# The cache limit: from --cache-max-memory (176 bytes per extent), or
# --cache-max-extents when that is smaller.
max_extents() {
  "$BSCACHE" --upstream "$(uri up)" --stats-file "$T/limit.json" --run true "$@" 2>"$T/run.log" || fail "--run true $*"
  jq '.cache.max_extents' "$T/limit.json"
}
[[ $(max_extents) == 1525201 ]] || fail "default limit: $(max_extents)"
[[ $(max_extents --cache-max-memory 1M --cache-max-extents 100000) == 5957 ]] || fail "--cache-max-memory 1M"
[[ $(max_extents --cache-max-memory 1G --cache-max-extents 100) == 100 ]] || fail "--cache-max-extents 100"
pass "cache limit from --cache-max-memory and --cache-max-extents, the smaller wins"

# SIGTERM: clean exit 0, pidfile and socket removed.
start_bscache bs --upstream "$(uri up)"
pid=$(cat "$T/bs.pid")
kill -TERM "$pid"
rc=0; wait "$pid" || rc=$?
((rc == 0)) || fail "SIGTERM exit status $rc"
[[ ! -e $T/bs.pid && ! -e $T/bs.sock ]] || fail "pidfile or socket left behind"
pass "SIGTERM exits 0 and cleans up"
