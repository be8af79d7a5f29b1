#!/usr/bin/env bash
# Fails if a file in cache/ or policy/ includes anything but the standard
# library, Boost.ICL and its own layer.
#
# The build already makes '#include "proxy/..."' fail there (each layer's
# include root holds only its own files, see CMakeLists.txt), but Debian puts
# Asio, Beast, libnbd and spdlog in /usr/include, visible to every target: only
# a check of the #include lines can keep them out. It is an allow-list, so a
# new kind of include has to be allowed here on purpose, in review.
# Usage: scripts/check-layering.sh [SOURCE_ROOT]   (default: this checkout)
set -euo pipefail
root=${1:-$(cd "$(dirname "$0")/.." && pwd)}

# layer directory -> extended regex of what its #include lines may name
declare -A allowed=(
  [cache]='^(<[a-z_]+>|<boost/icl/[a-z_/]+\.hpp>|"cache/[a-z_]+\.hpp")$'
  [policy]='^(<[a-z_]+>|"policy/[a-z_]+\.hpp")$'
)

bad=0
for layer in "${!allowed[@]}"; do
  [[ -d $root/$layer ]] || { echo "check-layering: $root/$layer missing" >&2; exit 1; }
  while IFS= read -r -d '' file; do
    lineno=0
    while IFS= read -r line; do
      lineno=$((lineno + 1))
      [[ $line =~ ^[[:space:]]*#[[:space:]]*include[[:space:]]*(.*[^[:space:]])[[:space:]]*$ ]] || continue
      target=${BASH_REMATCH[1]%%//*}
      target=${target%"${target##*[![:space:]]}"}
      if ! [[ $target =~ ${allowed[$layer]} ]]; then
        echo "${file#"$root"/}:$lineno: $layer/ may include only the standard library, Boost.ICL and $layer/: $target" >&2
        bad=1
      fi
    done <"$file"
  done < <(find "$root/$layer" -type f \( -name '*.cpp' -o -name '*.hpp' -o -name '*.h' \) -print0)
done
if ((bad)); then
  echo "check-layering: FAILED (cache/ and policy/ do no I/O: keep Asio, Beast, libnbd, spdlog and proxy/ out)" >&2
  exit 1
fi
echo "check-layering: cache/ and policy/ include only the standard library, Boost.ICL and themselves"
