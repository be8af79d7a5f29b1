#!/usr/bin/env bash
# Fetches qemu 10 (qemu-img, qemu-io, qemu-nbd) from Debian 12's backports
# suite into a private prefix (QEMU10_PREFIX, default .cache/qemu10), for the
# interop tests to run with a second qemu. Touches neither the system's apt
# configuration nor its qemu: the apt lists and sources are private (derived
# from the mirror this machine is configured with), the packages are fetched
# with `apt-get download` and unpacked with `dpkg -x`.
# Prints the prefix's bin/ directory; does nothing if it is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${QEMU10_PREFIX:-$PWD/.cache/qemu10}
if [[ -x $prefix/bin/qemu-img ]]; then echo "$prefix/bin"; exit 0; fi

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[[ $codename == bookworm ]] || { echo "qemu10: needs Debian 12 (bookworm), this is '$codename'" >&2; exit 1; }
# The mirror that serves this machine's own bookworm suite.
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk -v r="$codename" '$2 == r { print $1; exit }')
[[ -n $mirror ]] || { echo "qemu10: no Debian mirror for $codename in the apt configuration" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/bscache-qemu10.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
printf 'deb %s %s main\ndeb %s %s-backports main\n' "$mirror" "$codename" "$mirror" "$codename" >"$work/sources.list"
apt=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root
  -o Acquire::Retries=2 -o Acquire::http::Timeout=30)
apt-get "${apt[@]}" update -qq
# What installing qemu-utils from backports would bring on this machine
# (simulated only): qemu-utils itself, and any library newer than the system's.
mapfile -t wanted < <(apt-get "${apt[@]}" -s install -t "$codename-backports" qemu-utils |
  awk '/^Inst / { version = $0; sub(/^[^(]*\(/, "", version); sub(/ .*/, "", version); print $2 "=" version }')
((${#wanted[@]} > 0)) || { echo "qemu10: apt found nothing to fetch for qemu-utils from $codename-backports" >&2; exit 1; }
(cd "$work" && apt-get "${apt[@]}" download -qq "${wanted[@]}")

rm -rf "$prefix.new"
mkdir -p "$prefix.new/bin"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$prefix.new/root"; done
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
for tool in qemu-img qemu-io qemu-nbd; do
  [[ -x $prefix.new/root/usr/bin/$tool ]] || { echo "qemu10: the packages have no $tool" >&2; exit 1; }
  # Its own libraries first, and its own block modules, never the system qemu's.
  cat >"$prefix.new/bin/$tool" <<WRAPPER
#!/bin/sh
export LD_LIBRARY_PATH="$prefix/root/usr/lib/$multiarch\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export QEMU_MODULE_DIR="$prefix/root/usr/lib/$multiarch/qemu"
exec "$prefix/root/usr/bin/$tool" "\$@"
WRAPPER
  chmod +x "$prefix.new/bin/$tool"
done
if LD_LIBRARY_PATH="$prefix.new/root/usr/lib/$multiarch" ldd "$prefix.new/root/usr/bin/qemu-img" | grep 'not found' >&2; then
  echo "qemu10: qemu-img 10 lacks the libraries above" >&2
  exit 1
fi
rm -rf "$prefix"
mv "$prefix.new" "$prefix"
"$prefix/bin/qemu-img" --version | head -1 >&2
echo "$prefix/bin"
