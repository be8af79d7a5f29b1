#!/usr/bin/env bash
# Makes a throw-away PKI with certtool, in the directory layouts nbdkit,
# qemu and libnbd read:
#   DIR/server/  ca-cert.pem server-cert.pem server-key.pem   (nbdkit, qemu-nbd, bscache --tls-certificates)
#   DIR/client/  ca-cert.pem client-cert.pem client-key.pem   (libnbd tls-certificates=, qemu endpoint=client)
#   DIR/rogue/   the same client layout, but signed by another CA
#   DIR/keys.psk alice's PSK;  DIR/wrong.psk alice with another key
# Usage: tls_pki.sh DIR
set -euo pipefail
dir=$1
mkdir -p "$dir"/{server,client,rogue,ca,rogue-ca}
cd "$dir"
quiet() { "$@" >/dev/null 2>&1 || { echo "failed: $*" >&2; "$@"; exit 1; }; }

make_ca() {  # DIR CN
  printf 'cn = %s\nca\ncert_signing_key\nexpiration_days = 30\n' "$2" >"$1/ca.info"
  quiet certtool --generate-privkey --outfile "$1/ca-key.pem"
  quiet certtool --generate-self-signed --load-privkey "$1/ca-key.pem" --template "$1/ca.info" --outfile "$1/ca-cert.pem"
}
make_cert() {  # CA_DIR OUT_DIR NAME ROLE
  local ca=$1 out=$2 name=$3 role=$4
  {
    echo "organization = bscache tests"
    if [[ $role == server ]]; then
      printf 'cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\n'
    else
      printf 'cn = %s\ntls_www_client\n' "$name"
    fi
    printf 'encryption_key\nsigning_key\nexpiration_days = 30\n'
  } >"$out/$name.info"
  quiet certtool --generate-privkey --outfile "$out/$name-key.pem"
  quiet certtool --generate-certificate --load-ca-certificate "$ca/ca-cert.pem" --load-ca-privkey "$ca/ca-key.pem" \
    --load-privkey "$out/$name-key.pem" --template "$out/$name.info" --outfile "$out/$name-cert.pem"
  chmod 0600 "$out/$name-key.pem"
}

make_ca ca "bscache test CA"
make_ca rogue-ca "another CA"
cp ca/ca-cert.pem server/ && cp ca/ca-cert.pem client/
cp ca/ca-cert.pem rogue/  # trusts the right server, but its own certificate is the other CA's
make_cert ca server server server
make_cert ca client client client
make_cert rogue-ca rogue client client
quiet psktool -u alice -p keys.psk
quiet psktool -u alice -p wrong.psk
chmod 0600 keys.psk wrong.psk
