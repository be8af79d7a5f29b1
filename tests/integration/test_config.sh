#!/usr/bin/env bash
# --config FILE: every long option a key, the command line wins,
# --print-config prints a config file that reads back to the same settings,
# and a bad file is refused (exit 2) with its file, line and key named.
source "$(dirname "$0")/lib.sh"

start_nbdkit up memory 16M

# A config file alone runs the proxy; a switch set to true is in force.
cat >"$T/a.conf" <<CONF
# the upstream of this test
upstream = $(uri up)
unix = $T/bs.sock
pidfile = $T/bs.pid
   cache-max-extents   =   100
stats-file = $T/stats.json
; a semicolon comment
readonly = true
log-format = json
CONF
"$BSCACHE" --config "$T/a.conf" >"$T/bs.log" 2>&1 &
PIDS+=($!)
wait_for_file "$T/bs.pid"
[[ $(nbdinfo --size "$(uri bs)") == 16777216 ]] || fail "nbdinfo through the configured proxy"
qemu-io -f raw -c 'write 0 4k' "$(uri bs)" >"$T/write.out" 2>&1 && fail "readonly = true did not refuse a write"
grep -q '"message":"bscache ' "$T/bs.log" || fail "log-format = json not in force"
stop_server bs
jq -e '.cache.max_extents == 100' "$T/stats.json" >/dev/null || fail "cache-max-extents from the file: $(jq .cache "$T/stats.json")"
pass "the proxy runs from a config file alone (upstream, unix, pidfile, readonly, log-format, cache-max-extents)"

# The command line wins.
"$BSCACHE" --config "$T/a.conf" --cache-max-extents 50 --stats-file "$T/cli.json" --unix "$T/other.sock" --run true \
  2>"$T/run.log" || fail "--config with overrides"
jq -e '.cache.max_extents == 50' "$T/cli.json" >/dev/null || fail "the command line did not win"
pass "the command line wins over the file"

# --print-config: exit 0, the effective settings, read back to the same.
"$BSCACHE" --config "$T/a.conf" --cache-max-extents 50 --print-config >"$T/printed.conf" || fail "--print-config exit status"
grep -qx "cache-max-extents = 50" "$T/printed.conf" || fail "--print-config lacks the command line's value"
grep -qx "upstream = $(uri up)" "$T/printed.conf" || fail "--print-config lacks the file's value"
grep -qx "readonly = true" "$T/printed.conf" || fail "--print-config lacks the switch"
grep -qx "policy = exclusive" "$T/printed.conf" || fail "--print-config lacks a default"
grep -qx "# metrics =" "$T/printed.conf" || fail "--print-config should comment out an unset option"
grep -qE "^#? *(single|exit-with-parent|foreground|pid-file|read-only) =" "$T/printed.conf" \
  && fail "--print-config shows a command-line-only option or a second spelling"
"$BSCACHE" --config "$T/printed.conf" --print-config >"$T/again.conf" || fail "--print-config of its own output"
diff "$T/printed.conf" "$T/again.conf" || fail "--print-config output does not read back to the same settings"
"$BSCACHE" --print-config >"$T/defaults.conf" || fail "--print-config with nothing given"
"$BSCACHE" --config "$T/defaults.conf" --upstream "$(uri up)" --run true 2>"$T/run.log" || fail "the defaults as a file"
pass "--print-config prints a config file that reads back to the same settings"

# Bad files: exit 2, one line naming file, line and key; nothing listens.
refused() {  # PATTERN, then the file's lines
  local pattern=$1 rc=0; shift
  printf '%s\n' "upstream = $(uri up)" "unix = $T/x.sock" "$@" >"$T/bad.conf"
  timeout 20 "$BSCACHE" --config "$T/bad.conf" >"$T/err" 2>&1 || rc=$?
  ((rc == 2)) || { cat "$T/err"; fail "$* should exit 2, got $rc"; }
  [[ $(wc -l <"$T/err") == 1 ]] || { cat "$T/err"; fail "$*: more than one line"; }
  grep -q -- "^bscache: $T/bad.conf:$pattern" "$T/err" || { cat "$T/err"; fail "$*: no '$pattern'"; }
  [[ ! -e $T/x.sock ]] || fail "$* listened before refusing"
}
refused "3: unknown key 'frobnicate'" "frobnicate = 1"
refused "4: port must be a port number" "" "port = 99999"
refused "3: unknown key 'help'" "help = true"
refused "3: unknown key 'config'" "config = $T/a.conf"
refused "3: systemd must be true or false" "systemd = yes"
refused "3: expected 'key = value'" "just words"
refused "4: key 'unix' already given on line 2" "# comment" "unix = $T/y.sock"
refused "3: sections are not used" "[bscache]"
refused "3: policy must be" "policy = sometimes"
# How this one process was started, not a setting: command line only.
refused "3: single is for the command line only" "single = true"
refused "3: exit-with-parent is for the command line only" "exit-with-parent = true"
refused "3: unknown key 'foreground'" "foreground = true"
refused "3: unknown key 'pid-file'" "pid-file = $T/p.pid"
rc=0; "$BSCACHE" --config "$T/missing.conf" 2>"$T/err" || rc=$?
((rc == 2)) && grep -q "missing.conf.*No such file" "$T/err" || fail "a missing file: exit $rc, $(cat "$T/err")"
pass "bad keys, values and lines refused with exit 2, naming file, line and key"
