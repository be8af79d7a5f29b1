"""Strict-enough parser for the Prometheus text exposition format 0.0.4.

Reads the exposition on stdin; fails on any line that is not a valid HELP,
TYPE or sample line, on samples without a TYPE, on counters not ending in
_total, on histograms whose buckets are not cumulative or lack +Inf. Prints
the samples as JSON {"name{labels}": value} for the caller to inspect.
"""
import json
import math
import re
import sys

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
SAMPLE = re.compile(rf"^({NAME})(\{{(?:{LABEL})(?:,{LABEL})*\}})? (\S+)$")
types, helps, samples = {}, {}, {}


def family_of(name):
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
            return name[: -len(suffix)]
    return name


for number, line in enumerate(sys.stdin.read().splitlines(), 1):
    def bad(why):
        sys.exit(f"line {number}: {why}: {line!r}")
    if not line:
        bad("empty line")
    if line.startswith("# HELP "):
        parts = line.split(" ", 3)
        if len(parts) < 4 or not re.fullmatch(NAME, parts[2]):
            bad("malformed HELP")
        helps[parts[2]] = parts[3]
        continue
    if line.startswith("# TYPE "):
        parts = line.split(" ")
        if len(parts) != 4 or parts[3] not in ("counter", "gauge", "histogram", "summary", "untyped"):
            bad("malformed TYPE")
        if parts[2] in types:
            bad("duplicate TYPE")
        types[parts[2]] = parts[3]
        continue
    if line.startswith("#"):
        continue
    m = SAMPLE.match(line)
    if not m:
        bad("malformed sample")
    name, labels, value = m.group(1), m.group(2) or "", m.group(3)
    family = family_of(name)
    if family not in types:
        bad("sample before its TYPE")
    if family not in helps:
        bad("family without HELP")
    try:
        v = float(value)
    except ValueError:
        bad("value is not a number")
    if math.isnan(v):
        bad("NaN value")
    if types[family] == "counter" and not name.endswith("_total"):
        bad("counter name must end in _total")
    if not name.startswith("bscache_"):
        bad("name must start with bscache_")
    key = name + labels
    if key in samples:
        bad("duplicate sample")
    samples[key] = v

for family, kind in types.items():
    if kind != "histogram":
        continue
    # One histogram per label set (le aside): each must be cumulative and end in +Inf.
    series = {}
    for k, v in samples.items():
        if k.startswith(family + "_bucket"):
            series.setdefault(re.sub(r',?le="[^"]*"', "", k), []).append((k, v))
    if not series:
        sys.exit(f"{family}: no buckets")
    for labels, buckets in series.items():
        if not any('le="+Inf"' in k for k, _ in buckets):
            sys.exit(f"{labels}: no +Inf bucket")
        values = [v for _, v in buckets]
        if values != sorted(values):
            sys.exit(f"{labels}: buckets are not cumulative")
json.dump(samples, sys.stdout)
