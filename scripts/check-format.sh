#!/usr/bin/env bash
# Fails if any C++ source differs from what clang-format would write.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files '*.cpp' '*.hpp' 2>/dev/null || find . -name '*.[ch]pp' -not -path './build*')
if ((${#files[@]} == 0)); then exit 0; fi
if ! clang-format --dry-run --Werror "${files[@]}"; then
  echo "formatting differs: run clang-format -i on the files above" >&2
  exit 1
fi
