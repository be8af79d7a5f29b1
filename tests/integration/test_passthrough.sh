#!/usr/bin/env bash
# bscache as a transparent proxy: real clients see what they see directly.
source "$(dirname "$0")/lib.sh"

# A memory upstream with some data and some holes.
start_nbdkit up memory 64M
qemu-io -f raw -c 'write -P 0x11 0 1M' -c 'write -P 0x22 8M 512k' -c 'write -z 9M 1M' -c 'write -P 0x33 40M 4k' \
  "$(uri up)" >/dev/null
start_bscache bs --upstream "$(uri up)"

# qemu-img map: byte-identical output.
qemu-img map --output=json "$(uri up)" >"$T/direct.map"
qemu-img map --output=json "$(uri bs)" >"$T/proxy.map"
diff -u "$T/direct.map" "$T/proxy.map" || fail "qemu-img map differs"
grep -q '"data": true' "$T/direct.map" || fail "test image has no data extents"
pass "qemu-img map identical ($(wc -l <"$T/direct.map") extents)"

# nbdinfo: size, flags and contexts as upstream (multi-conn may differ: see README).
nbdinfo --json "$(uri up)" | jq -S '.exports[0] | del(.uri, .can_multi_conn)' >"$T/direct.info"
nbdinfo --json "$(uri bs)" | jq -S '.exports[0] | del(.uri, .can_multi_conn)' >"$T/proxy.info"
diff -u "$T/direct.info" "$T/proxy.info" || fail "nbdinfo --json differs"
pass "nbdinfo --json identical"
nbdinfo --list "$(uri bs)" | grep -q 'export=""' || fail "nbdinfo --list shows no export"
pass "nbdinfo --list"

# nbdcopy and qemu-img convert: the same bytes.
nbdcopy "$(uri bs)" "$T/proxy.img"
nbdcopy "$(uri up)" "$T/direct.img"
cmp "$T/direct.img" "$T/proxy.img" || fail "nbdcopy output differs"
qemu-img convert -f raw -O raw "$(uri bs)" "$T/converted.img"
cmp "$T/direct.img" "$T/converted.img" || fail "qemu-img convert output differs"
qemu-img convert -n -f raw "$(uri bs)" --target-image-opts driver=null-co,size=64M || fail "convert to null-co"
pass "nbdcopy and qemu-img convert byte-identical"

# Writes through the proxy reach upstream and read back.
qemu-io -f raw -c 'write -P 0xab 1M 64k' -c 'read -P 0xab 1M 64k' "$(uri bs)" >"$T/qemu-io.out"
grep -q 'read 65536/65536' "$T/qemu-io.out" || fail "qemu-io read back failed"
qemu-io -f raw -c 'read -P 0xab 1M 64k' "$(uri up)" >/dev/null || fail "write did not reach upstream"
qemu-io -f raw -c 'write -z 2M 64k' -c 'discard 3M 64k' -c 'flush' -c 'read -P 0 2M 64k' "$(uri bs)" >/dev/null \
  || fail "zero/discard/flush through proxy"
pass "qemu-io write, zero, discard, flush, read back"

# nbdcopy into the proxy: upstream gets exactly the bytes.
head -c 8M /dev/urandom >"$T/random.img"
nbdcopy "$T/random.img" "$(uri bs)"
nbdcopy "$(uri up)" "$T/after.img"
cmp -n $((8 << 20)) "$T/after.img" "$T/random.img" || fail "nbdcopy write differs"
pass "nbdcopy write byte-identical"
