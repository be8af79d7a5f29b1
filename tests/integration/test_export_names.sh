#!/usr/bin/env bash
# Export names and LIST as the upstream answers them (--exports passthrough):
# a name upstream accepts without listing it (nbdkit's single-disk plugins
# take any name) works through bscache as it does directly; two names of one
# disk never leave each other's cached map stale, a write racing a fetch
# through the other name included; and a LIST that fails upstream fails for
# the client with upstream's error, not as an empty list.
source "$(dirname "$0")/lib.sh"
py=/usr/bin/python3
here=$(cd "$(dirname "$0")" && pwd)

name_uri() { echo "nbd+unix:///$2?socket=$T/$1.sock"; }
map() { qemu-img map --output=json -f raw "$(name_uri "$1" "$2")"; }

# nbdkit memory lists only "" and serves its one disk under every name.
start_nbdkit up memory 64M
qemu-io -f raw -c 'write -P 1 0 1M' -c 'write -P 2 20M 1M' "$(uri up)" >/dev/null
start_bscache bs --upstream "$(uri up)" --stats-file "$T/bs.json"
nbdinfo "$(name_uri up export1)" >"$T/direct.info" || fail "direct: nbdinfo of export1"
nbdinfo "$(name_uri bs export1)" >"$T/bs.info" 2>"$T/bs.err" || fail "through bscache: nbdinfo of export1: $(cat "$T/bs.err")"
diff <(sed 's/bs.sock/X/' "$T/bs.info") <(sed 's/up.sock/X/' "$T/direct.info") >&2 || fail "nbdinfo export1 differs"
[[ $(map bs export1) == "$(map up export1)" ]] || fail "map of export1 differs from direct"
cmp <(nbdcopy "$(name_uri bs export1)" - | md5sum) <(nbdcopy "$(uri up)" - | md5sum) || fail "export1's bytes"
pass "a name upstream accepts but does not list works as direct (nbdinfo, map, bytes)"

# Both names cached; a write through either shows in the other's map at once.
map bs "" >/dev/null
map bs export1 >/dev/null
qemu-io -f raw -c 'write -P 3 40M 2M' "$(name_uri bs export1)" >/dev/null || fail "write through export1"
[[ $(map bs "") == "$(map up "")" ]] || fail "\"\"'s map is stale after a write through export1"
qemu-io -f raw -c 'write -P 4 50M 1M' "$(uri bs)" >/dev/null || fail "write through \"\""
[[ $(map bs export1) == "$(map up export1)" ]] || fail "export1's map is stale after a write through \"\""
qemu-io -f raw -c 'write -z 0 1M' "$(name_uri bs other)" >/dev/null || fail "zero through a third name"
[[ $(map bs "") == "$(map up "")" && $(map bs export1) == "$(map up export1)" ]] || fail "stale after a zero through \"other\""
kill -USR1 "$(cat "$T/bs.pid")"
wait_for_file "$T/bs.json"
jq -e '.exports | has("export1") and has("")' "$T/bs.json" >/dev/null || fail "exports: $(jq -c '.exports | keys' "$T/bs.json")"
grep -q 'export "export1" opened .*upstream does not list it' "$T/bs.log" || fail "the log does not say export1 may alias"
stop_server bs
pass "two names of one disk: a write, or zero, through one is seen through the other's map"

# The race: a fetch through "" sent while a write through export1 is in flight
# upstream (delayed 2 s) may see the disk before the write; it must not be
# kept. After the write, "" must show the data.
start_nbdkit slow --filter=delay memory 64M delay-write=2
start_bscache race --upstream "$(uri slow)"
map race "" >/dev/null                   # cached: all hole
map race export1 >/dev/null
qemu-io -f raw -c 'write -P 5 30M 1M' "$(name_uri race export1)" >/dev/null &
writer=$!
sleep 0.5                                # the write is now held by the delay filter
qemu-io -f raw -c 'map' "$(uri race)" >/dev/null   # a fetch through "" while it is in flight
wait "$writer" || fail "the delayed write failed"
[[ $(map race "") == "$(map slow "")" ]] || fail "\"\" kept the map fetched while the write through export1 was in flight"
[[ $(map race "" | jq -c '[.[] | select(.data)] | length') -ge 1 ]] || fail "no data after the write"
stop_server race
pass "a fetch through one name racing a write through another is not kept"

# LIST failing upstream: the client gets upstream's error (code and message), as directly.
cat >"$T/nolist.sh" <<'SH'
#!/bin/bash
case "$1" in
  get_size) echo 1M ;;
  pread) dd if=/dev/zero count="$3" iflag=count_bytes status=none ;;
  list_exports) echo "listing is broken today" >&2; exit 1 ;;
  *) exit 2 ;;
esac
SH
chmod +x "$T/nolist.sh"
start_nbdkit nolist sh "$T/nolist.sh"
start_bscache bl --upstream "$(uri nolist)"
nbdinfo --list "$(uri nolist)" >/dev/null 2>&1 && fail "direct LIST succeeded: the test needs a failing one"
nbdinfo --list "$(uri bl)" >"$T/bl.out" 2>&1 && fail "LIST through bscache succeeded: $(cat "$T/bl.out")"
raw_list() {  # the reply to LIST with client flags FIXED_NEWSTYLE only, as sent
  $py - "$here" "$1" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import nbdwire
c = nbdwire.connect_unix(sys.argv[2], client_flags=1)  # fixed newstyle
c.option(nbdwire.OPT_LIST)
while True:
    _, reply, payload = c.reply()
    if reply != 2:  # NBD_REP_SERVER
        break
print(hex(reply), payload.decode())
PY
}
direct=$(raw_list "$T/nolist.sock")
through=$(raw_list "$T/bl.sock")
[[ $through == "$direct" ]] || fail "LIST error through bscache '$through', direct '$direct'"
nbdinfo "$(uri bl)" >/dev/null || fail "the export itself is still served"
pass "a failing upstream LIST reaches the client as upstream sent it ($direct)"
