"""Do a `qemu-img map --output=json` and an `nbdinfo --map --json` describe
the same base:allocation map?

usage: same_map.py QEMU_IMG_MAP.json NBDINFO_MAP.json

For images too fragmented for a direct `qemu-img map` in test time (it asks
one REQ_ONE extent per call, and the upstream recomputes the rest of the disk
every time), the reference is nbdinfo's non-REQ_ONE map of the same upstream.
Both are reduced to runs of (start, end, hole, zero), joining equal neighbours.
"""
import json
import sys


def runs(entries):
    out = []
    for start, length, hole, zero in entries:
        if out and out[-1][1] == start and out[-1][2:] == [hole, zero]:
            out[-1][1] = start + length
        else:
            out.append([start, start + length, hole, zero])
    return out


with open(sys.argv[1]) as f:
    qemu = [(e["start"], e["length"], not e["data"], e["zero"]) for e in json.load(f)]
with open(sys.argv[2]) as f:
    nbdinfo = [(e["offset"], e["length"], bool(e["type"] & 1), bool(e["type"] & 2)) for e in json.load(f)]
a, b = runs(qemu), runs(nbdinfo)
if a != b:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            sys.exit(f"maps differ at run {i}: qemu-img {x}, nbdinfo {y} ({len(a)} vs {len(b)} runs)")
    sys.exit(f"maps differ in length: {len(a)} vs {len(b)} runs")
print(f"same map: {len(a)} runs")
