#!/usr/bin/env bash
# make_extents.sh SIZE_BYTES COUNT SEED > file
# Writes an nbdkit-extentlist file: COUNT alternating data / hole+zero
# extents of pseudo-random lengths (multiples of 64 KiB) covering SIZE bytes.
set -euo pipefail
awk -v size="$1" -v count="$2" -v seed="$3" 'BEGIN {
  srand(seed); unit = 65536; units = size / unit; pos = 0; total_weight = 0
  for (i = 0; i < count; i++) { w[i] = 1 + int(rand() * 100); total_weight += w[i] }
  for (i = 0; i < count && pos < units; i++) {
    len = int(w[i] * units / total_weight); if (len < 1) len = 1
    if (i == count - 1 || pos + len > units) len = units - pos
    type = (i % 2 == 0) ? "" : "hole,zero"
    printf "%.0f %.0f %s\n", pos * unit, len * unit, type
    pos += len
  }
}'
