#!/usr/bin/env bash
# Logs: --log-format json writes one JSON object per line (time, level,
# message); with stderr on systemd's journal stream (JOURNAL_STREAM names its
# device and inode) every line starts with its syslog priority; a
# JOURNAL_STREAM that names another file changes nothing.
source "$(dirname "$0")/lib.sh"

start_nbdkit up memory 16M
run_bscache() {  # LOGFILE ARGS...: a captive run (one map), stderr to LOGFILE
  local log=$1; shift
  "$BSCACHE" --upstream "$(uri up)" --run 'qemu-img map "$uri" >/dev/null' "$@" 2>>"$log" || fail "bscache $* failed"
}

# JSON lines. A bad NOTIFY_SOCKET makes a warning to look for.
NOTIFY_SOCKET=not-a-path run_bscache "$T/json.log" --log-format json --log-level debug
lines=$(wc -l <"$T/json.log")
((lines >= 3)) || fail "only $lines log lines"
jq -e -s 'all(.[]; (keys_unsorted == ["time", "level", "message"])
                 and (.time | test("^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}\\.[0-9]{3}Z$"))
                 and (.message | type == "string"))' "$T/json.log" >/dev/null \
  || { cat "$T/json.log"; fail "not one {time, level, message} object per line"; }
jq -e -s 'any(.[]; .level == "info" and (.message | startswith("bscache ")))' "$T/json.log" >/dev/null \
  || fail "no start-up line"
jq -e -s 'any(.[]; .level == "warning" and (.message | contains("NOTIFY_SOCKET")))' "$T/json.log" >/dev/null \
  || fail "no warning"
jq -e -s 'any(.[]; .level == "debug")' "$T/json.log" >/dev/null || fail "no debug line"
pass "--log-format json: $lines lines, each {time, level, message}"

# The journal: stderr is the stream JOURNAL_STREAM names.
: >"$T/journal.log"
stream=$(stat -c '%d:%i' "$T/journal.log")
JOURNAL_STREAM=$stream NOTIFY_SOCKET=not-a-path run_bscache "$T/journal.log" --log-level debug
grep -vqE '^<[0-7]>' "$T/journal.log" && { cat "$T/journal.log"; fail "a journal line without its priority"; }
grep -qE '^<6>info bscache ' "$T/journal.log" || fail "start-up line not at priority 6"
grep -qE '^<4>warning NOTIFY_SOCKET' "$T/journal.log" || fail "warning not at priority 4"
grep -qE '^<7>debug ' "$T/journal.log" || fail "debug not at priority 7"
: >"$T/journal-json.log"
JOURNAL_STREAM=$(stat -c '%d:%i' "$T/journal-json.log") run_bscache "$T/journal-json.log" --log-format json
sed 's/^<[0-7]>//' "$T/journal-json.log" | jq -e -s 'length >= 2' >/dev/null || fail "json to the journal"
pass "on the journal stream: <priority> on every line, json too"

# JOURNAL_STREAM inherited, but stderr goes elsewhere: plain text as usual.
JOURNAL_STREAM=$stream run_bscache "$T/plain.log"
grep -qE '^<[0-7]>' "$T/plain.log" && fail "priorities written to a file that is not the journal"
grep -qE '^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:.]+ info bscache ' "$T/plain.log" || { cat "$T/plain.log"; fail "text format"; }
pass "JOURNAL_STREAM of another file: text with timestamps"

rc=0; "$BSCACHE" --upstream "$(uri up)" --unix "$T/x.sock" --log-format xml 2>"$T/err" || rc=$?
((rc == 2)) && grep -q -- '--log-format' "$T/err" || fail "--log-format xml: exit $rc, $(cat "$T/err")"
pass "--log-format xml refused"
