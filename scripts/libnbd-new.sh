#!/usr/bin/env bash
# Builds a newer libnbd (Debian 13 "trixie"'s source package, 1.22 as of
# writing: extended headers, nbd_block_status_64, block_status_filter) into a
# private prefix (LIBNBD_NEW_PREFIX, default .cache/libnbd-new), to build
# bscache against it and to run its newer nbdinfo, nbdsh and nbdcopy in the
# integration tests. Touches neither the system's apt configuration nor its
# libnbd 1.14: the apt lists are private (a deb-src line for trixie on the
# mirror this machine is configured with), the source is fetched with
# `apt-get source`, and every build dependency is a Debian 12 package that
# scripts/deps.sh installs.
# The prefix holds lib/ (libnbd.so, pkgconfig/libnbd.pc), include/libnbd.h,
# bin/nbdinfo and bin/nbdcopy (their rpath is the prefix's lib/), bin/nbdsh
# (a wrapper that runs the system python with the private module) and
# python/ (the `nbd` module: never on the system's site-packages, where it
# would hide Debian's 1.14 module). `. PREFIX/env` puts all of it first in
# PATH, PYTHONPATH, LD_LIBRARY_PATH and PKG_CONFIG_PATH.
# Prints the prefix; does nothing if it is already there. Exits 75 when the
# source cannot be had (not Debian 12, no mirror, the mirror unreachable), so
# that callers can skip rather than fail; any other failure is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${LIBNBD_NEW_PREFIX:-$PWD/.cache/libnbd-new}
if [[ -x $prefix/bin/nbdinfo && -f $prefix/env ]]; then echo "$prefix"; exit 0; fi

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[[ $codename == bookworm ]] || { echo "libnbd-new: needs Debian 12 (bookworm), this is '$codename'" >&2; exit 75; }
# What the configure line below needs, all from Debian 12 (scripts/deps.sh).
for p in gcc make pkg-config dpkg-dev libgnutls28-dev libxml2-dev python3-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
    { echo "libnbd-new: $p is not installed (scripts/deps.sh installs it)" >&2; exit 1; }
done
# The mirror that serves this machine's own bookworm suite also has trixie.
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk -v r="$codename" '$2 == r { print $1; exit }')
[[ -n $mirror ]] || { echo "libnbd-new: no Debian mirror for $codename in the apt configuration" >&2; exit 75; }

work=$(mktemp -d "${TMPDIR:-/tmp}/bscache-libnbd-new.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
printf 'deb-src %s trixie main\n' "$mirror" >"$work/sources.list"
apt=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root
  -o Acquire::Retries=2 -o Acquire::http::Timeout=30)
apt-get "${apt[@]}" update -qq || { echo "libnbd-new: cannot read trixie's sources from $mirror" >&2; exit 75; }
# apt checks the sources against trixie's signed Release file (Debian 12's
# keyring has trixie's keys) and dpkg-source applies Debian's patches.
(cd "$work" && apt-get "${apt[@]}" source -qq libnbd >/dev/null) ||
  { echo "libnbd-new: cannot fetch trixie's libnbd source from $mirror" >&2; exit 75; }
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'libnbd-*' | head -1)
[[ -n $src ]] || { echo "libnbd-new: apt-get source unpacked no libnbd" >&2; exit 1; }

# Only what bscache and its tests use: the library, nbdinfo, nbdcopy, nbdsh
# and the python module. The release tarball carries the generated sources,
# so no OCaml is needed; PERL=no skips the manual pages, --disable-static
# half of the compiling. The system python (a pyenv python on PATH would
# build a module /usr/bin/python3 cannot load).
log=$work/build.log
echo "libnbd-new: building $(basename "$src") into $prefix (log: $log while it runs)" >&2
(cd "$src" && PERL=no PYTHON=/usr/bin/python3 ./configure -q --prefix="$prefix" \
  --with-python-installdir="$prefix/python" --disable-static --disable-dependency-tracking \
  --disable-ocaml --disable-golang --disable-rust --disable-fuse --disable-ublk \
  --without-bash-completions) >"$log" 2>&1 || { tail -n 30 "$log" >&2; exit 1; }
# The subdirectories in the order the top-level Makefile builds them, minus
# docs, examples, tests and the other bindings and tools.
subdirs=(generator include common/include common/utils lib python sh info copy)
for d in "${subdirs[@]}"; do
  make -C "$src/$d" -j"$(nproc)" >>"$log" 2>&1 || { tail -n 30 "$log" >&2; exit 1; }
done
# Installed into a staging root first, so an interrupted run leaves no prefix
# that looks complete (the rpaths libtool writes already name $prefix).
for d in include lib python sh info copy; do
  make -C "$src/$d" install DESTDIR="$work/dest" >>"$log" 2>&1 || { tail -n 30 "$log" >&2; exit 1; }
done
staged=$work/dest$prefix
rm -f "$staged"/lib/*.la "$staged"/python/*.la
# libnbd.pc names neither its include directory nor its library directory
# (it assumes /usr): without them a build would compile against the system's
# libnbd.h and link the system's libnbd. The rpath lets what links it run
# without LD_LIBRARY_PATH.
sed -i -e 's|^Cflags:.*|Cflags: -I${includedir}|' -e 's|^Libs:.*|Libs: -L${libdir} -Wl,-rpath,${libdir} -lnbd|' \
  "$staged/lib/pkgconfig/libnbd.pc"
# Debian's nbdsh runs `python3 -mnbd`; this one runs it with the private module.
cat >"$staged/bin/nbdsh" <<WRAPPER
#!/bin/sh
export PYTHONPATH="$prefix/python\${PYTHONPATH:+:\$PYTHONPATH}"
exec /usr/bin/python3 -m nbd "\$@"
WRAPPER
chmod +x "$staged/bin/nbdsh"
cat >"$staged/env" <<ENV
# Source it: the libnbd built by scripts/libnbd-new.sh comes first.
export PATH="$prefix/bin\${PATH:+:\$PATH}"
export PYTHONPATH="$prefix/python\${PYTHONPATH:+:\$PYTHONPATH}"
export LD_LIBRARY_PATH="$prefix/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig\${PKG_CONFIG_PATH:+:\$PKG_CONFIG_PATH}"
ENV
rm -rf "$prefix"
mkdir -p "$(dirname "$prefix")"
mv "$staged" "$prefix"
# The tools must run with the private library, not the system's 1.14.
version=$(PKG_CONFIG_PATH="$prefix/lib/pkgconfig" pkg-config --modversion libnbd)
"$prefix/bin/nbdinfo" --version | grep -q "libnbd $version" ||
  { echo "libnbd-new: nbdinfo does not run with libnbd $version" >&2; "$prefix/bin/nbdinfo" --version >&2; exit 1; }
"$prefix/bin/nbdsh" -c "assert h.get_version() == '$version', h.get_version()" ||
  { echo "libnbd-new: nbdsh does not run with libnbd $version" >&2; exit 1; }
echo "libnbd-new: libnbd $version in $prefix" >&2
echo "$prefix"
