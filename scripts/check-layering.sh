#!/usr/bin/env bash
# Fails if a file in cache/, policy/ or one of proxy/'s wings includes
# anything its layer may not use: cache/ and policy/ only the standard library
# and Boost.ICL; each wing of proxy/ only the wings below it (README,
# "Architecture") and the third-party headers named for it here. libnbd is
# allowed in proxy/upstream/ alone, GnuTLS in proxy/server/ alone, Asio and
# spdlog nowhere below proxy/io/.
#
# The build already makes '#include "proxy/..."' fail from a layer that does
# not link it (each layer's include root holds only its own files, see
# CMakeLists.txt), but Debian puts Asio, Beast, libnbd, GnuTLS and spdlog in
# /usr/include, visible to every target: only a check of the #include lines
# can keep them out. It is an allow-list, so a new kind of include has to be
# allowed here on purpose, in review. proxy/ itself (main, app, options) may
# include everything and is not listed.
# Usage: scripts/check-layering.sh [SOURCE_ROOT]   (default: this checkout)
set -euo pipefail
root=${1:-$(cd "$(dirname "$0")/.." && pwd)}

# What several layers may name.
std='<[a-z_]+>'
posix='<(fcntl|malloc|poll|signal|unistd)\.h>|<(sys|netinet)/[a-z_]+\.h>'
asio='<boost/asio/[a-z_/]+\.hpp>'
spdlog='<spdlog/[a-z_/]+\.h>'
wings='wire|negotiation|io|ops|upstream|exports|server'

# layer directory -> extended regex of what its #include lines may name
declare -A allowed=(
  [cache]="^(<[a-z_]+>|<boost/icl/[a-z_/]+\.hpp>|\"cache/[a-z_]+\.hpp\")\$"
  [policy]="^(<[a-z_]+>|\"policy/[a-z_]+\.hpp\")\$"
  [proxy/wire]="^($std|\"(proxy/wire/)?[a-z_]+\.hpp\")\$"
  [proxy/negotiation]="^($std|\"proxy/(wire|negotiation)/[a-z_]+\.hpp\")\$"
  [proxy/io]="^($std|$posix|$asio|<boost/intrusive/[a-z_]+\.hpp>|$spdlog|\"proxy/io/[a-z_]+\.hpp\")\$"
  [proxy/ops]="^($std|$posix|$asio|<boost/beast/[a-z_/]+\.hpp>|$spdlog|<nlohmann/json\.hpp>|\"proxy/(wire|io|ops)/[a-z_]+\.hpp\")\$"
  [proxy/upstream]="^($std|$posix|$asio|$spdlog|<libnbd\.h>|\"proxy/(wire|negotiation|io|ops|upstream)/[a-z_]+\.hpp\")\$"
  [proxy/exports]="^($std|$asio|$spdlog|\"(cache|policy)/[a-z_]+\.hpp\"|\"proxy/(wire|negotiation|io|ops|upstream|exports)/[a-z_]+\.hpp\")\$"
  [proxy/server]="^($std|$posix|$asio|<boost/container/[a-z_]+\.hpp>|$spdlog|<gnutls/gnutls\.h>|\"policy/[a-z_]+\.hpp\"|\"proxy/($wings)/[a-z_/]+\.hpp\")\$"
)
# layer directory -> what the message says it may include
declare -A meaning=(
  [cache]='the standard library, Boost.ICL and cache/'
  [policy]='the standard library and policy/'
  [proxy/wire]='the standard library and proxy/wire/'
  [proxy/negotiation]='the standard library and proxy/{wire,negotiation}/'
  [proxy/io]='the standard library, POSIX, Asio, Boost.Intrusive, spdlog and proxy/io/'
  [proxy/ops]='the standard library, POSIX, Asio, Beast, spdlog, nlohmann/json and proxy/{wire,io,ops}/'
  [proxy/upstream]='the standard library, POSIX, Asio, spdlog, libnbd and proxy/{wire,negotiation,io,ops,upstream}/'
  [proxy/exports]='the standard library, Asio, spdlog, cache/, policy/ and proxy/{wire,negotiation,io,ops,upstream,exports}/'
  [proxy/server]='the standard library, POSIX, Asio, Boost.Container, spdlog, GnuTLS, policy/ and every wing of proxy/'
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
        echo "${file#"$root"/}:$lineno: $layer/ may include only ${meaning[$layer]}: $target" >&2
        bad=1
      fi
    done <"$file"
  done < <(find "$root/$layer" -type f \( -name '*.cpp' -o -name '*.hpp' -o -name '*.h' \) -print0)
done
if ((bad)); then
  echo "check-layering: FAILED (see the README's Architecture section for what each layer may use)" >&2
  exit 1
fi
echo "check-layering: cache/, policy/ and proxy/'s wings include only what their layer allows"
