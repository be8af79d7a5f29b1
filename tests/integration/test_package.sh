#!/usr/bin/env bash
# Packaging: scripts/package.sh turns this build into a .deb whose Depends:
# names the shared libraries' packages; unpacked into a fresh directory with
# dpkg -x, its bscache runs, and it carries the man page and the example units.
source "$(dirname "$0")/lib.sh"
root=$(cd "$(dirname "$0")/../.." && pwd)

BUILD_DIR=$TEST_TOOLS OUT_DIR=$T/dist "$root/scripts/package.sh" --no-build >"$T/package.log" 2>&1 \
  || { cat "$T/package.log"; fail "scripts/package.sh"; }
deb=$(ls "$T"/dist/bscache_*.deb)
[[ -f $deb ]] || fail "no .deb made"
depends=$(dpkg-deb -f "$deb" Depends)
for lib in libnbd0 libspdlog libboost-program-options libstdc++6; do
  [[ $depends == *"$lib"* ]] || fail "Depends lacks $lib: $depends"
done
pass "$(basename "$deb"), Depends: $depends"

dpkg -x "$deb" "$T/root"
version=$("$T/root/usr/bin/bscache" --version) || fail "the unpacked bscache does not run"
[[ $version == "bscache $(dpkg-deb -f "$deb" Version)" ]] || fail "--version says '$version'"
for file in usr/share/man/man1/bscache.1.gz usr/share/doc/bscache/bscache@.service usr/share/doc/bscache/bscache@.socket \
  usr/share/doc/bscache/bscache.conf.example usr/share/doc/bscache/bscache.json; do
  [[ -s $T/root/$file ]] || fail "the package lacks $file"
done
zcat "$T/root/usr/share/man/man1/bscache.1.gz" | grep -q '^\.TH BSCACHE' || fail "the man page is not a man page"
pass "unpacked with dpkg -x: $version, man page and units present"

# The example units parse: no unknown keys, no bad values (systemd-analyze
# prints nothing for clean units), with ExecStart pointed at the unpacked binary.
command -v systemd-analyze >/dev/null || skip "systemd-analyze missing (Debian package systemd): units not checked"
mkdir "$T/units"
for kind in service socket; do
  sed "s|^ExecStart=bscache |ExecStart=$T/root/usr/bin/bscache |" "$T/root/usr/share/doc/bscache/bscache@.$kind" \
    >"$T/units/bscache@test.$kind"
done
grep -q "^ExecStart=$T/root/usr/bin/bscache " "$T/units/bscache@test.service" || fail "no ExecStart=bscache in the unit"
(cd "$T/units" && timeout 60 systemd-analyze verify --man=no ./bscache@test.service ./bscache@test.socket) \
  >"$T/verify.out" 2>&1 || { cat "$T/verify.out"; fail "systemd-analyze verify failed"; }
[[ ! -s $T/verify.out ]] || { cat "$T/verify.out"; fail "systemd-analyze verify complains about the units"; }
pass "systemd-analyze verify: the example units are clean"
