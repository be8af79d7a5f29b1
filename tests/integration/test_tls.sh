#!/usr/bin/env bash
# TLS on both sides, with real peers and certificates made by certtool at test
# time (tls_pki.sh): bscache as a TLS server to nbdinfo, nbdcopy, qemu-img
# (qemu's own TLS client) and a byte-level probe (tls_probe.py), with X.509 and
# PSK; bscache as a TLS client to nbdkit and qemu-nbd upstreams, through a
# reconnect. Every map and every byte is compared with direct access.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
PKI=$T/pki
bash "$here/tls_pki.sh" "$PKI"

# An image with data and holes, served plainly as the reference.
truncate -s 256M "$T/disk.img"
for off in 3 40 41 97 250; do
  head -c $((192 * 1024)) /dev/urandom | dd of="$T/disk.img" bs=64K seek=$((off * 16)) conv=notrunc status=none
done
start_nbdkit up file "$T/disk.img"
direct_map=$(nbdinfo --map "$(uri up)")
direct_qmap=$(qemu-img map --output=json -f raw "$(uri up)")

tls_uri() { echo "nbds+unix:///?socket=$T/$1.sock&tls-certificates=$PKI/${2:-client}"; }
psk_uri() { echo "nbds+unix://${3:-alice}@/?socket=$T/$1.sock&tls-psk-file=$PKI/${2:-keys.psk}"; }
# qemu has no nbds:// URIs: TLS comes from a tls-creds object.
qemu_opts() { echo "driver=nbd,server.type=unix,server.path=$T/$1.sock,tls-creds=tls0,tls-hostname=localhost"; }
qemu_tls() {  # qemu_tls NAME CREDS_OBJECT map|info [args...]
  local name=$1 creds=$2 cmd=$3; shift 3
  qemu-img "$cmd" --object "$creds" "$@" --image-opts "$(qemu_opts "$name")"
}
x509_client="tls-creds-x509,id=tls0,dir=$PKI/client,endpoint=client"
psk_client="tls-creds-psk,id=tls0,dir=$PKI,username=alice,endpoint=client"

# ---- X.509, --tls require ----
start_bscache x509 --upstream "$(uri up)" --tls require --tls-certificates "$PKI/server" --handshake-timeout 2s
[[ $(nbdinfo --map "$(tls_uri x509)") == "$direct_map" ]] || fail "nbdinfo --map over TLS differs from direct"
[[ $(qemu_tls x509 "$x509_client" map --output=json) == "$direct_qmap" ]] || fail "qemu-img map over TLS differs"
qemu-img convert -O raw --object "$x509_client" --image-opts "$(qemu_opts x509)" "$T/copy.raw"
cmp "$T/disk.img" "$T/copy.raw" || fail "qemu-img convert over TLS: bytes differ"
rm -f "$T/copy.raw"
nbdcopy "$(tls_uri x509)" "$T/copy.raw" && cmp "$T/disk.img" "$T/copy.raw" || fail "nbdcopy over TLS: bytes differ"
pass "X.509 require: nbdinfo, qemu-img map and convert, nbdcopy equal to direct"

if nbdinfo "$(uri x509)" >/dev/null 2>&1; then fail "a plain client was served by --tls require"; fi
python3 "$here/tls_probe.py" "$T/x509.sock" "$PKI/client/ca-cert.pem" require || fail "STARTTLS probe (require)"
grep -q "TLS handshake failed" "$T/x509.log" || fail "no log line for a failed TLS handshake"
grep -q "handshake timed out" "$T/x509.log" || fail "no log line for a TLS handshake that never finished"
# One line per bad TLS client: plain bytes after STARTTLS, garbage instead of
# a ClientHello, a client that left in the middle of its ClientHello, and one
# offering at most TLS 1.1.
(($(grep -c "TLS handshake failed" "$T/x509.log") >= 4)) || fail "not every bad TLS client was logged"
# ... and the client that offered at most TLS 1.1 was refused by bscache, for its version.
grep -q "TLS handshake failed: A packet with illegal or unsupported version" "$T/x509.log" \
  || fail "a TLS 1.1 client was not refused for its version"
[[ $(nbdinfo --map "$(tls_uri x509)") == "$direct_map" ]] || fail "TLS clients no longer served after the bad ones"
pass "X.509 require: plain clients get TLS_REQD, bad TLS input is logged and dropped, others still served"
stop_server x509

# Captive mode: $uri names TLS, and the child connects with its credentials added.
"$BSCACHE" --upstream "$(uri up)" --tls require --tls-certificates "$PKI/server" \
  --run "nbdinfo --map \"\$uri&tls-certificates=$PKI/client\" >$T/run.map" >"$T/run.log" 2>&1 \
  || fail "--run with --tls require: $(cat "$T/run.log")"
[[ $(cat "$T/run.map") == "$direct_map" ]] || fail "--run with --tls require: wrong map"
pass "--run with --tls require: \$uri is an nbds+unix:// URI"

# ---- --tls on: plain and TLS clients alike ----
start_bscache opt --upstream "$(uri up)" --tls on --tls-certificates "$PKI/server" --handshake-timeout 2s
[[ $(nbdinfo --map "$(uri opt)") == "$direct_map" ]] || fail "--tls on: plain client"
[[ $(nbdinfo --map "$(tls_uri opt)") == "$direct_map" ]] || fail "--tls on: TLS client"
python3 "$here/tls_probe.py" "$T/opt.sock" "$PKI/client/ca-cert.pem" on || fail "STARTTLS probe (on)"
pass "--tls on: plain and TLS clients served; plain-text negotiation forgotten after STARTTLS"
stop_server opt

# ---- client certificates ----
start_bscache verify --upstream "$(uri up)" --tls require --tls-certificates "$PKI/server" --tls-verify-peer
[[ $(nbdinfo --map "$(tls_uri verify)") == "$direct_map" ]] || fail "--tls-verify-peer refused a good client"
if nbdinfo --map "$(tls_uri verify rogue)" >/dev/null 2>&1; then fail "a certificate from another CA was accepted"; fi
grep -q "TLS handshake failed" "$T/verify.log" || fail "--tls-verify-peer: refusal not logged"
[[ $(qemu_tls verify "$x509_client" map --output=json) == "$direct_qmap" ]] || fail "qemu-img with a client cert"
pass "--tls-verify-peer: the right CA's client served, another CA's refused"
stop_server verify

# ---- PSK ----
start_bscache psk --upstream "$(uri up)" --tls require --tls-psk "$PKI/keys.psk"
[[ $(nbdinfo --map "$(psk_uri psk)") == "$direct_map" ]] || fail "PSK client"
if nbdinfo --map "$(psk_uri psk wrong.psk)" >/dev/null 2>&1; then fail "a wrong PSK was accepted"; fi
[[ $(qemu_tls psk "$psk_client" map --output=json) == "$direct_qmap" ]] || fail "qemu-img with PSK"
psktool -u bob -p "$PKI/keys.psk" >/dev/null
[[ $(nbdinfo --map "$(psk_uri psk keys.psk bob)") == "$direct_map" ]] || fail "a key added to the PSK file was not seen"
grep -q "readable by others" "$T/psk.log" && fail "warned about a 0600 PSK file"
pass "PSK: right key served, wrong key refused, qemu-img works, keys added to the file take effect"
stop_server psk

cp "$PKI/keys.psk" "$T/open.psk" && chmod 0644 "$T/open.psk"
start_bscache openpsk --upstream "$(uri up)" --tls require --tls-psk "$T/open.psk"
grep -q "readable by others" "$T/openpsk.log" || fail "no warning for a PSK file readable by others"
stop_server openpsk

# ---- refused at start (exit 2, one clear line) ----
refused() {  # refused "EXPECTED TEXT" ARGS...
  local expected=$1 rc=0; shift
  "$BSCACHE" --upstream "$(uri up)" --unix "$T/refused.sock" "$@" >"$T/refused.out" 2>&1 || rc=$?
  ((rc == 2)) || fail "bscache $* exited $rc, not 2"
  grep -q -- "$expected" "$T/refused.out" || fail "bscache $*: no '$expected' in: $(cat "$T/refused.out")"
}
refused "exactly one of" --tls require
refused "exactly one of" --tls on --tls-certificates "$PKI/server" --tls-psk "$PKI/keys.psk"
refused "need --tls on" --tls-certificates "$PKI/server"
refused "no such file" --tls require --tls-certificates "$T/nowhere"
refused "no such file" --tls require --tls-psk "$T/nowhere.psk"
refused "tls-priority" --tls require --tls-certificates "$PKI/server" --tls-priority "NORMAL:+NONSENSE"
refused "must be off, on or require" --tls maybe
pass "bad TLS settings refused at start with exit 2"

# ---- upstream TLS ----
# nbdkit, X.509 via the URI; then a restart of upstream: the reconnect negotiates TLS again.
start_nbdkit uptls --tls=require --tls-certificates="$PKI/server" file "$T/disk.img"
start_bscache ux509 --upstream "nbds+unix:///?socket=$T/uptls.sock&tls-certificates=$PKI/client"
[[ $(nbdinfo --map "$(uri ux509)") == "$direct_map" ]] || fail "through a TLS upstream (nbdkit X.509)"
# Killed, not stopped: nbdkit waits for its TLS clients (bscache) to leave first.
kill -9 "$(cat "$T/uptls.pid")"
for _ in $(seq 100); do kill -0 "$(cat "$T/uptls.pid")" 2>/dev/null || break; sleep 0.05; done
start_nbdkit uptls --tls=require --tls-certificates="$PKI/server" file "$T/disk.img"
ok=0
for _ in $(seq 50); do
  if [[ $(nbdinfo --map "$(uri ux509)" 2>/dev/null) == "$direct_map" ]]; then ok=1; break; fi
  sleep 0.2
done
((ok)) || fail "no service after the TLS upstream restarted"
nbdcopy "$(uri ux509)" "$T/copy2.raw" && cmp "$T/disk.img" "$T/copy2.raw" || fail "bytes through a TLS upstream"
rm -f "$T/copy2.raw"
pass "nbdkit X.509 upstream: maps and bytes equal, TLS renegotiated after an upstream restart"
stop_server ux509
stop_server uptls

# nbdkit with PSK, named by options rather than the URI.
start_nbdkit uppsk --tls=require --tls-psk="$PKI/keys.psk" file "$T/disk.img"
start_bscache upsk --upstream "nbds+unix:///?socket=$T/uppsk.sock" --upstream-tls-psk "$PKI/keys.psk" \
  --upstream-tls-username alice
[[ $(nbdinfo --map "$(uri upsk)") == "$direct_map" ]] || fail "through a PSK upstream (--upstream-tls-psk)"
stop_server upsk
# TLS on both sides at once.
start_bscache both --upstream "nbds+unix://alice@/?socket=$T/uppsk.sock&tls-psk-file=$PKI/keys.psk" \
  --tls require --tls-certificates "$PKI/server"
nbdcopy "$(tls_uri both)" "$T/copy3.raw" && cmp "$T/disk.img" "$T/copy3.raw" || fail "TLS on both sides: bytes"
rm -f "$T/copy3.raw"
pass "nbdkit PSK upstream by options and by URI; TLS on both sides at once"
stop_server both
stop_server uppsk

# --upstream-command with TLS (socket activation, then TLS over it).
start_bscache ucmd --upstream-command "nbdkit --tls=require --tls-certificates=$PKI/server file $T/disk.img" \
  --upstream-tls-certificates "$PKI/client"
[[ $(nbdinfo --map "$(uri ucmd)") == "$direct_map" ]] || fail "--upstream-command with TLS"
stop_server ucmd
rc=0
"$BSCACHE" --upstream "$(uri up)" --upstream-tls-certificates "$PKI/client" --unix "$T/bad.sock" >"$T/bad.out" 2>&1 \
  || rc=$?
((rc != 0)) && grep -q "nbds://" "$T/bad.out" || fail "--upstream-tls-* with an nbd:// URI was not refused clearly"
pass "--upstream-command with TLS; --upstream-tls-* with a plain URI refused"

# qemu-nbd, X.509 and PSK.
start_qemu_nbd() {  # NAME CREDS_OBJECT
  rm -f "$T/$1.pid"
  qemu-nbd -t -f raw -k "$T/$1.sock" --pid-file="$T/$1.pid" --object "$2" --tls-creds tls0 "$T/disk.img" \
    >"$T/$1.log" 2>&1 &
  PIDS+=($!)
  wait_for_file "$T/$1.pid"
}
start_qemu_nbd qx509 "tls-creds-x509,id=tls0,dir=$PKI/server,endpoint=server"
start_bscache uq --upstream "nbds+unix:///?socket=$T/qx509.sock&tls-certificates=$PKI/client"
[[ $(nbdinfo --map "$(uri uq)") == "$direct_map" ]] || fail "through qemu-nbd with X.509"
stop_server uq
stop_server qx509
start_qemu_nbd qpsk "tls-creds-psk,id=tls0,dir=$PKI,endpoint=server"
start_bscache uqp --upstream "nbds+unix://alice@/?socket=$T/qpsk.sock&tls-psk-file=$PKI/keys.psk"
[[ $(nbdinfo --map "$(uri uqp)") == "$direct_map" ]] || fail "through qemu-nbd with PSK"
pass "qemu-nbd upstream with X.509 and with PSK"
