#!/usr/bin/env bash
# qemu 10 as a client (from bookworm-backports, fetched by scripts/qemu10.sh
# into a private prefix): it negotiates extended headers with bscache (see
# test_extended_headers for what they carry), then map, write -z, convert and
# compare through bscache must agree with the upstream itself.
source "$(dirname "$0")/lib.sh"
bin=$(qemu10_bin) || exit $?
version=$("$bin/qemu-img" --version | head -1)

start_nbdkit up memory 64M
start_bscache bs --upstream "$(uri up)"
"$bin/qemu-io" -f raw -c 'write -P 0xab 1M 1M' -c 'write -z 8M 4M' -c 'write -P 0xcd 20M 64k' "$(uri bs)" >/dev/null \
  || fail "qemu-io 10 writes through bscache"
"$bin/qemu-io" -f raw -c 'read -P 0xab 1M 1M' -c 'read -P 0 8M 4M' -c 'read -P 0xcd 20M 64k' "$(uri up)" >/dev/null \
  || fail "the writes did not reach upstream as written"
"$bin/qemu-img" map --output=json "$(uri bs)" >"$T/proxied.json" || fail "qemu-img 10 map through bscache"
"$bin/qemu-img" map --output=json "$(uri up)" >"$T/direct.json" || fail "qemu-img 10 map of upstream"
diff <(jq -c '.[] | {start, length, data, zero}' "$T/direct.json") \
  <(jq -c '.[] | {start, length, data, zero}' "$T/proxied.json") || fail "maps differ"
pass "$version: writes, write -z and map through bscache agree with upstream"

"$bin/qemu-img" convert -f raw -O qcow2 "$(uri bs)" "$T/copy.qcow2" || fail "qemu-img 10 convert from bscache"
"$bin/qemu-img" compare -f raw -F qcow2 "$(uri up)" "$T/copy.qcow2" >/dev/null || fail "the copy differs from upstream"
pass "convert through bscache and compare with upstream"
