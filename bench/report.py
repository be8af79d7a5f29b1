"""Turns bench/run.sh's raw.tsv into RESULTS.md (tables and ratios) and ratios.png.

usage: report.py RAW_TSV OUT_DIR MODE
"""
import csv
import datetime
import os
import platform
import subprocess
import sys
from collections import defaultdict

raw, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
rows = list(csv.DictReader(open(raw), delimiter="\t"))
by = defaultdict(dict)
for r in rows:
    by[(r["workload"], r["metric"])][r["contender"]] = r


def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "?"


def cpu():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def libnbd_version():
    return version(["pkg-config", "--modversion", "libnbd"])


lower_is_better = {"seconds", "microseconds", "rss_bytes_per_extent", "estimated_bytes_per_extent", "peak_rss_mib"}
lines = [
    "# bscache benchmark results",
    "",
    f"Measured {datetime.date.today().isoformat()} by `bench/run.sh{' --quick' if mode == 'quick' else ''}`"
    f" ({mode} mode) on {cpu()}, {os.cpu_count()} cores.",
    f"qemu: {version(['qemu-img', '--version'])}; nbdkit: {version(['nbdkit', '--version'])}; "
    f"libnbd: {libnbd_version()}.",
    "",
    "Each row gives the median, fastest and slowest of the runs. Ratios compare medians: "
    "for times, below 1 means bscache is faster; for rates, above 1 means bscache is better.",
    "",
]
ratio_rows = []
for (workload, metric), contenders in by.items():
    lines.append(f"## {workload} — {metric}")
    lines.append("")
    lines.append("| contender | median | min | max | runs |")
    lines.append("|---|---|---|---|---|")
    for name, r in contenders.items():
        lines.append(f"| {name} | {float(r['median']):.4g} | {float(r['min']):.4g} | {float(r['max']):.4g} | {r['runs']} |")
    note = next((r["note"] for r in contenders.values() if r["note"]), "")
    if note:
        lines += ["", f"_{note}_"]
    # In the tls rows the subject is bscache over TLS, against direct over TLS,
    # nbdkit's nbd plugin over TLS and itself in plain text. A peak_rss_mib row
    # has no direct (no front), so its ratios are against the other fronts.
    subject = "bscache-tls" if "bscache-tls" in contenders else "bscache"
    if subject in contenders:
        b = float(contenders[subject]["median"])
        ratios = []
        others = ("direct", "cacheextents", "floor", "nbdkit-nbd", "bscache-libnbd", "bscache-off", "bscache-baseline")
        if subject == "bscache-tls":
            others = ("direct-tls", "nbdkit-nbd-tls", "bscache", "direct")
        for other in others:
            if other in contenders and float(contenders[other]["median"]) > 0:
                ratio = b / float(contenders[other]["median"])
                ratios.append(f"{subject}/{other} = **{ratio:.3g}**")
                ratio_rows.append((f"{workload}:{metric}", other, ratio, metric in lower_is_better))
        if ratios:
            lines += ["", "Ratios: " + ", ".join(ratios)]
    lines.append("")

micro = os.path.join(out, "micro.txt")
if os.path.exists(micro) and os.path.getsize(micro) > 0:
    lines += ["## cache micro-benchmarks (Google Benchmark)", "", "```", open(micro).read().rstrip(), "```", ""]

with open(os.path.join(out, "RESULTS.md"), "w") as f:
    f.write("\n".join(lines) + "\n")

# The chart: bscache's time relative to each contender (log scale; < 1 is faster).
data = os.path.join(out, "ratios.dat")
with open(data, "w") as f:
    for i, (label, other, ratio, lower) in enumerate(r for r in ratio_rows if r[3] and r[0].endswith(":seconds")):
        f.write(f'{i} "{label.replace(":seconds", "")} vs {other}" {ratio}\n')
script = f"""
set terminal png size 1100,600
set rmargin 10
set bmargin 9
set output '{os.path.join(out, "ratios.png")}'
set title 'bscache time / contender time (median; below 1 = bscache faster)'
set logscale y
set yrange [0.001:10]
set style fill solid 0.6
set boxwidth 0.7
set xtics rotate by -40 font ',8'
set grid ytics
unset key
plot '{data}' using 1:3:xtic(2) with boxes, 1 with lines lc rgb 'red'
"""
try:
    subprocess.run(["gnuplot"], input=script, text=True, check=True, capture_output=True)
except (OSError, subprocess.CalledProcessError) as e:
    print(f"no chart: {e}", file=sys.stderr)
