#!/usr/bin/env bash
# Builds the Debian package: dist/bscache_VERSION_ARCH.deb (or OUT_DIR).
# Its Depends: line comes from the shared libraries the binary links
# (CPack runs dpkg-shlibdeps, from dpkg-dev).
# Usage: scripts/package.sh [--no-build]
#   BUILD_DIR  build tree to package (default build-package, a Release build)
#   OUT_DIR    where the .deb goes (default dist/)
#   --no-build package BUILD_DIR as it is (the tests use this on their own build)
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build-package}
out_dir=${OUT_DIR:-dist}

if [[ ${1:-} != --no-build ]]; then
  BUILD_DIR=$build_dir BUILD_TYPE=Release scripts/build.sh -DBSCACHE_TESTS=OFF
fi
[[ -f $build_dir/CPackConfig.cmake ]] || { echo "package: $build_dir is not a configured build tree" >&2; exit 1; }
mkdir -p "$out_dir"
work=$(mktemp -d "${TMPDIR:-/tmp}/bscache-cpack.XXXXXX")
trap 'rm -rf "$work"' EXIT
cpack -G DEB --config "$build_dir/CPackConfig.cmake" -B "$work" >"$work/cpack.log" 2>&1 || {
  cat "$work/cpack.log" >&2
  exit 1
}
mv "$work"/*.deb "$out_dir"/
ls "$out_dir"/*.deb
