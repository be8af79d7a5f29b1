#!/usr/bin/env bash
# Writes to a read-only export fail with EPERM; reads still work.
source "$(dirname "$0")/lib.sh"

start_nbdkit up -r memory 16M
start_bscache bs --upstream "$(uri up)"
nbdinfo --json "$(uri bs)" | jq -e '.exports[0].is_read_only == true' >/dev/null || fail "not advertised read-only"
/usr/bin/python3 - "$(uri bs)" <<'PY' || fail "read-only upstream"
import sys, errno, nbd
h = nbd.NBD(); h.set_strict_mode(0); h.connect_uri(sys.argv[1])
try:
    h.pwrite(b"x" * 512, 0); sys.exit("write succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
assert h.pread(512, 0) == bytes(512)
PY
pass "read-only upstream: EPERM on write"

start_nbdkit rw memory 16M
start_bscache ro --upstream "$(uri rw)" --readonly
/usr/bin/python3 - "$(uri ro)" <<'PY' || fail "--readonly"
import sys, errno, nbd
h = nbd.NBD(); h.set_strict_mode(0); h.connect_uri(sys.argv[1])
assert h.is_read_only()
for op in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.zero(512, 0), lambda: h.trim(512, 0)):
    try:
        op(); sys.exit("mutation succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
PY
pass "--readonly: EPERM on write, zero, trim"
