#!/usr/bin/env bash
# Installs what bscache needs to build, test and benchmark (Debian 12, as root).
# Installs nothing when everything is already there.
# libxml2-dev and python3-dev: scripts/libnbd-new.sh builds a newer libnbd
# (with its URI support and python module) from Debian 13's source.
set -euo pipefail

packages=(
  g++ cmake make pkg-config
  libboost-dev libboost-program-options-dev libspdlog-dev libfmt-dev nlohmann-json3-dev
  libnbd-dev libnbd-bin libgnutls28-dev gnutls-bin python3-libnbd nbdkit nbdkit-plugin-python qemu-utils
  libgtest-dev libbenchmark-dev clang clang-format clang-tidy libclang-rt-14-dev
  curl jq bc gnuplot-nox procps iproute2 strace linux-perf
  dpkg-dev file help2man groff-base systemd
  libxml2-dev python3-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
echo "installing: ${missing[*]}" >&2
sudo=""
if [[ $(id -u) != 0 ]]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
