"""Driver of test_counters.sh: every counter of README's "Statistics and metrics"
moves, by exactly as much as the action behind it says.

usage: counters.py TMPDIR README.md
The shell has started the servers named below (lib.sh conventions: NAME.sock,
NAME.pid, NAME.log, stats file NAME.json, metrics endpoint in NAME.log).

Each step snapshots a proxy (SIGUSR1 -> stats file, and GET /metrics), runs
one action, snapshots again and compares EVERY counter: those named in
`delta` must move by exactly that much, every other one must not move. Every
snapshot also checks the JSON keys against README's table, README's metric
names against /metrics (both ways), each metric against its JSON value, and the
invariants (hit_rate, upstream_calls_saved, hits + misses = validated
block-status requests). At the end every README key must have been seen to
move under an explicit expectation (cache.max_extents, fixed for a process, by
differing as asserted between proxies started with different limits).
"""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import nbd

T, README = sys.argv[1], sys.argv[2]
HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30

failures = []
# client.memory_pauses never moves here (nothing comes near --max-client-memory): every step
# asserts it stays, and test_memory_bound makes it move with 200 clients against the bound.
# upstream.extended_headers stays 0 (nbdkit 1.32 serves no extended headers): every step asserts
# it stays, "at start" says so, and test_extended_headers makes it move in front of qemu-nbd 10.
covered = {"client.memory_pauses", "upstream.extended_headers"}


def failure(message):
    failures.append(message)
    print(f"FAIL: {message}")


# ---- the contract, read from README ------------------------------------------------------------
def readme_contract(path):
    text = open(path, encoding="utf-8").read()
    section = text.split("## Statistics and metrics", 1)[1].split("\n## ", 1)[0]
    keys, ops = [], []
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", cells[0])
        prefix = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
        keys += [prefix + n if n.startswith(".") else n for n in names]
        if "<op>" in cells[0] and not ops:
            ops = re.findall(r"`([a-z_]+)`", cells[1])
    assert ops, "README's table names no ops"
    expanded = []
    # exports.<name>.* repeat the per-export keys: checked against them (see export_problems).
    keys = [k for k in keys if not k.startswith("exports.")]
    for k in keys:
        # This test's clients ask about base:allocation alone (nbdkit has no other context).
        k = k.replace("<context>", CONTEXT)
        expanded += [k.replace("<op>", op) for op in ops] if "<op>" in k else [k]
    prom = section.split("**Prometheus**", 1)[1].split("**Logs**", 1)[0]
    metrics = re.findall(r"`(bscache_[a-z_]+)(\{[^}]*\})?`( \(histogram\))?", prom)
    return expanded, ops, [(name, labels, bool(hist)) for name, labels, hist in metrics]


CONTEXT = "base:allocation"
KEYS, OPS, METRICS = readme_contract(README)
# The per-context counters of the one context asked about move with the totals.
MIRRORS = {f"block_status.contexts.{CONTEXT}.hits": "block_status.hits",
           f"block_status.contexts.{CONTEXT}.misses": "block_status.misses",
           f"block_status.contexts.{CONTEXT}.hit_rate": "block_status.hit_rate",
           f"block_status.contexts.{CONTEXT}.upstream_calls": "upstream.requests.block_status"}
NON_COUNTERS = {"uptime_seconds", "policy"}
# What clients hold and the bound on it are sampled values, not counters:
# checked in every snapshot (nothing held at rest, the default bound) and
# against /metrics; the trims run on a timer (see MemoryReclaimer).
MEMORY_GAUGES = {"client.memory_bytes", "client.memory_paused", "client.memory_limit_bytes", "process.memory_trims"}
NON_COUNTERS |= MEMORY_GAUGES
# A quarter of RAM, at least 256 MiB: --max-client-memory's default.
DEFAULT_CLIENT_MEMORY = max(256 * 1024 * 1024, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)
# Functions of other counters: checked by invariants at every snapshot and
# asserted only where a step names them.
DERIVED = {"block_status.hit_rate", "block_status.upstream_calls_saved", "cache.memory_bytes",
           "upstream.block_status_latency_seconds.mean", f"block_status.contexts.{CONTEXT}.hit_rate"}


def prom_name(key):
    """The /metrics sample that carries the JSON key's value (None: JSON only)."""
    simple = {
        "uptime_seconds": "bscache_uptime_seconds",
        "client.connections_current": "bscache_client_connections",
        "client.connections_total": "bscache_client_connections_total",
        "client.connections_rejected": "bscache_client_connections_rejected_total",
        "block_status.hits": "bscache_block_status_hits_total",
        "block_status.misses": "bscache_block_status_misses_total",
        "block_status.hit_rate": "bscache_block_status_hit_ratio",
        "block_status.upstream_calls_saved": "bscache_upstream_calls_saved_total",
        "upstream.connections": "bscache_upstream_connections",
        "upstream.extended_headers": "bscache_upstream_extended_headers",
        "upstream.reconnects": "bscache_upstream_reconnects_total",
        "upstream.reads_spliced": "bscache_upstream_reads_spliced_total",
        "upstream.writes_spliced": "bscache_upstream_writes_spliced_total",
        "upstream.block_status_latency_seconds.count":
            'bscache_upstream_request_duration_seconds_count{op="block_status"}',
        "cache.extents": "bscache_cache_extents",
        "cache.max_extents": "bscache_cache_max_extents",
        "cache.bypassed": "bscache_cache_bypassed_total",
        "cache.memory_bytes": "bscache_cache_memory_bytes",
        "cache.evictions": "bscache_cache_evictions_total",
        "cache.expirations": "bscache_cache_expirations_total",
        "cache.prefetches": "bscache_prefetches_total",
        "cache.prefetches_used": "bscache_prefetches_used_total",
        "cache.ranges_invalidated": "bscache_cache_ranges_invalidated_total",
        "cache.ranges_updated": "bscache_cache_ranges_updated_total",
        "client.memory_bytes": "bscache_client_memory_bytes",
        "client.memory_limit_bytes": "bscache_client_memory_limit_bytes",
        "client.memory_pauses": "bscache_client_memory_pauses_total",
        "client.memory_paused": "bscache_client_memory_paused",
        "process.memory_trims": "bscache_memory_trims_total",
    }
    if key in simple:
        return simple[key]
    m = re.fullmatch(r"block_status\.contexts\.(.+)\.(hits|misses|hit_rate|upstream_calls)", key)
    if m:
        family = {"hits": "hits_total", "misses": "misses_total", "hit_rate": "hit_ratio",
                  "upstream_calls": "upstream_calls_total"}[m.group(2)]
        return f'bscache_block_status_context_{family}{{context="{m.group(1)}"}}'
    m = re.fullmatch(r"(client|upstream)\.(requests|errors)\.([a-z_]+)", key)
    if m:
        return f'bscache_{m.group(1)}_{m.group(2)}_total{{op="{m.group(3)}"}}'
    return None


def flatten(doc, prefix=""):
    out = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# ---- one proxy under test -----------------------------------------------------------------------
class Proxy:
    def __init__(self, name, policy="exclusive"):
        self.name = name
        self.pid = int(open(f"{T}/{name}.pid").read())
        self.stats = f"{T}/{name}.json"
        self.uri = f"nbd+unix:///?socket={T}/{name}.sock"
        self.policy = policy
        m = re.search(r"metrics on (http://\S+/metrics)", open(f"{T}/{name}.log").read())
        assert m, f"{name}: no metrics endpoint in the start-up log"
        self.url = m.group(1)
        self.not_validated_bs = 0  # invalid block-status requests sent: neither hit nor miss
        self.last = None
        self.last_metrics = None  # /metrics read with the last snapshot

    def read(self):
        try:
            os.unlink(self.stats)
        except FileNotFoundError:
            pass
        os.kill(self.pid, signal.SIGUSR1)
        for _ in range(400):
            if os.path.exists(self.stats):  # written to a temporary file, then renamed
                break
            time.sleep(0.025)
        else:
            sys.exit(f"{self.name}: no stats file 10 s after SIGUSR1")
        with open(self.stats) as f:
            doc = flatten(json.load(f))
        text = subprocess.run(["curl", "-sf", self.url], capture_output=True, check=True).stdout
        parsed = subprocess.run([PY, f"{HERE}/prom_check.py"], input=text, capture_output=True)
        if parsed.returncode != 0:
            sys.exit(f"{self.name}: /metrics is not valid Prometheus text: {parsed.stderr.decode()}")
        return doc, json.loads(parsed.stdout)

    def export_problems(self, s, p):
        """exports.<name>.*: each export has the per-export keys and `open`; with one export its counters
        are the totals, in JSON and in /metrics (the series with its `export` label)."""
        out = []
        per_export = {k for k in KEYS if k.split(".", 1)[0] in ("block_status", "upstream", "cache")
                      or re.fullmatch(r"client\.(requests|errors)\.[a-z_]+", k)}
        names = {}
        for k, v in s.items():
            if k.startswith("exports."):
                name, sub = re.fullmatch(r"exports\.(.*?)\.((?:open|client|block_status|upstream|cache)\b.*)", k).groups()
                names.setdefault(name, {})[sub] = v
        if len(names) > 1:  # none before the first client chose one
            out.append(f"expected at most one export in the stats, found {sorted(names)}")
        for name, keys in names.items():
            if set(keys) != per_export | {"open"}:
                out.append(f"exports.{name}: keys differ: missing {sorted(per_export | {'open'} - set(keys))}, "
                           f"extra {sorted(set(keys) - per_export - {'open'})}")
                continue
            if keys["open"] is not True:
                out.append(f"exports.{name}.open is {keys['open']}")
            for k in per_export:
                if keys[k] != s[k] and not (isinstance(s[k], float) and abs(keys[k] - s[k]) < 1e-9):
                    out.append(f"exports.{name}.{k} = {keys[k]}, but the total {k} = {s[k]} (one export)")
                metric = prom_name(k)
                if metric is None:
                    continue
                label = f'export="{name}"'
                labelled = metric.replace("{", "{" + label + ",") if "{" in metric else metric + "{" + label + "}"
                if labelled not in p:
                    out.append(f"/metrics lacks {labelled}")
                elif p[labelled] != p.get(metric):
                    out.append(f"{labelled} = {p[labelled]} but {metric} = {p.get(metric)} (one export)")
        return out

    def problems(self, s, p):
        """Everything that must hold in any snapshot `s` (JSON) with `p` (/metrics) taken right after."""
        out = self.export_problems(s, p)
        s = {k: v for k, v in s.items() if not k.startswith("exports.")}
        for mirror, source in MIRRORS.items():
            if mirror in s and source in s and abs(s[mirror] - s[source]) > 1e-9:
                out.append(f"{mirror} = {s[mirror]}, but {source} = {s[source]} (the one context asked about)")
        if set(s) != set(KEYS):
            out.append(f"stats keys differ from README: missing {sorted(set(KEYS) - set(s))}, "
                       f"not in README {sorted(set(s) - set(KEYS))}")
        for name, labels, histogram in METRICS:
            if histogram:
                lab = labels[1:-1]
                want = [f"{name}_bucket{{{lab},le=\"+Inf\"}}", f"{name}_sum{labels}", f"{name}_count{labels}"]
            elif labels == "{op}":
                want = [f'{name}{{op="{op}"}}' for op in OPS]
            elif labels == "{context}":
                want = [f'{name}{{context="{CONTEXT}"}}']
            elif labels == "{policy}":
                want = [f'{name}{{policy="{s.get("policy")}"}}']
            else:
                want = [name + (labels or "")]
            out += [f"/metrics lacks {w} (README names {name}{labels or ''})" for w in want if w not in p]
        named = {name for name, _, _ in METRICS}
        histograms = {name for name, _, histogram in METRICS if histogram}
        for sample in p:
            family = sample.split("{", 1)[0]
            base = re.sub(r"_(bucket|sum|count)$", "", family)
            if family not in named and base not in histograms:
                out.append(f"/metrics has {sample}, a metric README does not name")
        for key in KEYS:
            name = prom_name(key)
            if name is None or key not in s:
                continue
            if name not in p:
                out.append(f"/metrics lacks {name}, the metric of {key}")
                continue
            if key == "uptime_seconds":
                if not 0 < s[key] <= p[name]:
                    out.append(f"uptime: JSON {s[key]}, /metrics (read later) {p[name]}")
            elif abs(p[name] - s[key]) > 1e-9 * max(1, abs(s[key])):
                out.append(f"{key} = {s[key]} in JSON but {name} = {p[name]}")
        if s.get("policy") != self.policy:
            out.append(f"policy is {s.get('policy')!r}, expected {self.policy!r}")
        hist = 'bscache_upstream_request_duration_seconds{}{{op="block_status"}}'
        count, total = p.get(hist.format("_count"), 0), p.get(hist.format("_sum"), 0)
        if p.get(hist.format("_bucket").replace("}", ',le="+Inf"}')) != count:
            out.append("histogram: +Inf bucket != _count")
        mean = s.get("upstream.block_status_latency_seconds.mean", 0)
        if (count == 0 and mean != 0) or (count > 0 and (mean <= 0 or abs(mean - total / count) > 1e-9 + 1e-6 * mean)):
            out.append(f"latency mean {mean} but /metrics sum {total} / count {count}")
        hits, misses = s["block_status.hits"], s["block_status.misses"]
        rate = hits / (hits + misses) if hits + misses else 0.0
        if abs(s["block_status.hit_rate"] - rate) > 1e-12:
            out.append(f"hit_rate {s['block_status.hit_rate']} != hits / (hits + misses) = {rate}")
        validated = s["client.requests.block_status"] - self.not_validated_bs
        if hits + misses != validated:
            out.append(f"hits {hits} + misses {misses} != validated block-status requests {validated}")
        saved = s["client.requests.block_status"] - s["upstream.requests.block_status"]  # signed
        if s["block_status.upstream_calls_saved"] != saved:
            out.append(f"upstream_calls_saved {s['block_status.upstream_calls_saved']} != client - upstream = {saved}")
        if s.get("client.memory_limit_bytes") != DEFAULT_CLIENT_MEMORY:
            out.append(f"client.memory_limit_bytes {s.get('client.memory_limit_bytes')}, expected the default "
                       f"{DEFAULT_CLIENT_MEMORY} (a quarter of RAM, at least 256 MiB)")
        if s.get("client.memory_bytes") != 0 or s.get("client.memory_paused") != 0:
            out.append(f"at rest clients hold {s.get('client.memory_bytes')} bytes, "
                       f"{s.get('client.memory_paused')} paused (expected 0)")
        extents, memory = s["cache.extents"], s["cache.memory_bytes"]
        if (extents == 0) != (memory == 0) or memory < 64 * extents:
            out.append(f"cache.memory_bytes {memory} implausible for {extents} extents")
        return out

    def snap(self, until=None, timeout=20):
        deadline = time.time() + timeout
        while True:
            s, p = self.read()
            problems = self.problems(s, p)
            self.last_metrics = p
            reached = until is None or until(s)
            if reached and not problems:
                return s
            if time.time() > deadline:
                for problem in problems:
                    failure(f"{self.name}: {problem}")
                if not reached:
                    failure(f"{self.name}: the awaited state never came")
                return s
            time.sleep(0.05)

    def step(self, label, action=None, delta=None, values=None, ignore=(), until=None):
        """Runs `action`; then every counter must have moved by delta[key] (0 if
        absent), or must equal values[key] (a number, or a predicate of (after, before))."""
        delta, values = dict(delta or {}), dict(values or {})
        for mirror, source in MIRRORS.items():
            if source in delta:
                delta[mirror] = delta[source]
            if source in values:
                values[mirror] = values[source]
        ignore = set(ignore) | {mirror for mirror, source in MIRRORS.items() if source in ignore}
        if self.last is None:
            self.last = self.snap()
        before = self.last
        result = action() if action else None
        after = self.snap(until)
        bad = []
        for key in KEYS:
            if key in NON_COUNTERS or key in ignore:
                continue
            if key in values:
                want = values[key]
                ok = want(after[key], before[key]) if callable(want) else abs(after[key] - want) < 1e-9
                what = f"{key} = {after[key]} (was {before[key]})" + ("" if callable(want) else f", expected {want}")
            elif key in delta or key not in DERIVED:
                ok = after[key] - before[key] == delta.get(key, 0)
                what = f"{key} moved by {after[key] - before[key]} ({before[key]} -> {after[key]}), " \
                       f"expected {delta.get(key, 0)}"
            else:
                continue
            if ok and after[key] != before[key]:
                covered.add(key)
            if not ok:
                bad.append(what)
        if after["uptime_seconds"] <= before["uptime_seconds"]:
            bad.append("uptime_seconds did not increase")
        for b in bad:
            failure(f"{self.name}: {label}: {b}")
        if not bad:
            print(f"ok: {self.name}: {label}")
        self.last = after
        return result


def client(uri, meta=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def block_status(h, length, offset):
    seen = []
    h.block_status(length, offset, lambda ctx, off, entries, err: seen.extend(entries) or 0)
    return seen


def block_status_req_one(h, length, offset):
    seen = []
    h.block_status(length, offset, lambda ctx, off, entries, err: seen.extend(entries) or 0,
                   flags=nbd.CMD_FLAG_REQ_ONE)
    return seen


def answers(what, fn, want):
    """An action whose block-status answer (length, flags, ...) must be `want`."""
    def run():
        got = fn()
        if got != want:
            failure(f"{what}: block status answered {got}, expected {want}")
    return run


def fails(errnum, fn, *args):
    """An action that must fail with `errnum` (None: any error)."""
    def run():
        try:
            fn(*args)
        except nbd.Error as err:
            if errnum is not None and err.errnum != errnum:
                failure(f"{getattr(fn, '__name__', fn)}{args}: expected errno {errnum}, got {err}")
            return
        failure(f"{getattr(fn, '__name__', fn)}{args}: succeeded, expected errno {errnum}")
    return run


def qemu_io(uri, *commands):
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return lambda: subprocess.run(args + [uri], check=True, stdout=subprocess.DEVNULL)


def mutation(name, n=1, ok=True, spliced=True):
    """The client and upstream counts of `n` mutations (plus their cache bracket)."""
    d = {f"client.requests.{name}": n, f"upstream.requests.{name}": n, "cache.ranges_invalidated": n}
    if name == "write" and spliced:  # from the client to a multi-conn upstream (the default), failed or not
        d["upstream.writes_spliced"] = n
    if ok:
        d["cache.ranges_updated"] = n
    else:
        d.update({f"client.errors.{name}": n, f"upstream.errors.{name}": n})
    return d


def plus(*deltas):
    out = {}
    for d in deltas:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def op(name, n=1, upstream=True, error=False, spliced=True):
    d = {f"client.requests.{name}": n}
    if upstream:
        d[f"upstream.requests.{name}"] = n
    # A READ that succeeds through a multi-conn upstream (the default data
    # path) is spliced: its data never enters bscache's memory.
    if name == "read" and upstream and not error and spliced:
        d["upstream.reads_spliced"] = n
    if error:
        d[f"client.errors.{name}"] = n
        if upstream:
            d[f"upstream.errors.{name}"] = n
    return d


def positive(after, before):
    return after > 0


def grew(after, before):
    return after > before


# ================================================================================================
# A: nbdkit memory behind the error filter (errors only while $T/fail exists), 4 upstream
#    connections (the error filter keeps memory's multi-conn), --prefetch off.
a = Proxy("a")
a.step("at start", values={"upstream.connections": 4, "upstream.extended_headers": 0, "client.connections_current": 0})
h = a.step("a client connects", lambda: client(a.uri),
           delta={"client.connections_total": 1}, values={"client.connections_current": 1})

# qemu-io: each run is one more connection, its commands, and one FLUSH when it closes.
back_to_one = lambda s: s["client.connections_current"] == 1  # noqa: E731 - qemu-io's session has ended
qemu = {"client.connections_total": 1, **op("flush")}
a.step("qemu-io read", qemu_io(a.uri, "read 0 64k"), plus(qemu, op("read")), until=back_to_one)
a.step("qemu-io write", qemu_io(a.uri, "write -P 0xab 0 64k"), plus(qemu, mutation("write")),
       values={"cache.extents": positive}, until=back_to_one)
a.step("qemu-io flush", qemu_io(a.uri, "flush"), plus(qemu, op("flush")), until=back_to_one)
a.step("qemu-io discard", qemu_io(a.uri, "discard 0 64k"), plus(qemu, mutation("trim")),
       ignore=["cache.extents"], until=back_to_one)
a.step("qemu-io write -z", qemu_io(a.uri, "write -z 0 64k"), plus(qemu, mutation("write_zeroes")),
       ignore=["cache.extents"], until=back_to_one)

# libnbd, one request at a time.
a.step("pread", lambda: h.pread(4096, 0), op("read"))
a.step("pwrite", lambda: h.pwrite(b"w" * 4096, 0), mutation("write"), ignore=["cache.extents"])
a.step("flush", h.flush, op("flush"))
a.step("trim", lambda: h.trim(64 * KIB, 64 * KIB), mutation("trim"), ignore=["cache.extents"])
a.step("zero", lambda: h.zero(64 * KIB, 128 * KIB), mutation("write_zeroes"), ignore=["cache.extents"])
a.step("cache", lambda: h.cache(64 * KIB, 0), op("cache"))
a.step("block status, cold: a miss", lambda: block_status(h, 64 * KIB, MIB),
       plus(op("block_status"), {"block_status.misses": 1, "upstream.block_status_latency_seconds.count": 1,
                                 "block_status.upstream_calls_saved": 0}),
       values={"cache.extents": grew, "cache.memory_bytes": grew,
               "upstream.block_status_latency_seconds.mean": positive, "block_status.hit_rate": 0.0})
a.step("block status again: a hit", lambda: block_status(h, 64 * KIB, MIB),
       {"client.requests.block_status": 1, "block_status.hits": 1, "block_status.upstream_calls_saved": 1},
       values={"block_status.hit_rate": 0.5})

# Invalid requests (past the end: ENOSPC for writes, EINVAL otherwise, as nbdkit answers; an unknown flag):
h.set_strict_mode(0)
size = h.get_size()
past = size - 4096 + 512  # starts inside, ends past the end
for name, action in [("read", fails(errno.EINVAL, h.pread, 4096, past)),
                     ("write", fails(errno.ENOSPC, h.pwrite, b"x" * 4096, past)),
                     ("trim", fails(errno.EINVAL, h.trim, 4096, past)),
                     ("cache", fails(errno.EINVAL, h.cache, 4096, size)),
                     ("write_zeroes", fails(errno.ENOSPC, h.zero, 4096, past)),
                     ("block_status", fails(errno.EINVAL, block_status, h, 4096, size)),
                     ("flush", fails(errno.EINVAL, h.flush, 0x80))]:
    want = op(name, upstream=False, error=True)
    if name == "block_status":
        a.not_validated_bs += 1
        want["block_status.upstream_calls_saved"] = 1  # client requests minus upstream ones, as defined
    a.step(f"invalid {name}", action, want)
h.set_strict_mode(nbd.STRICT_COMMANDS | nbd.STRICT_FLAGS | nbd.STRICT_BOUNDS | nbd.STRICT_ZERO_SIZE
                  | nbd.STRICT_ALIGN)

# Upstream failures: every op except FLUSH (no hook in nbdkit 1.32's error filter; see B).
open(f"{T}/fail", "w").close()
a.step("upstream fails a read", fails(errno.EIO, h.pread, 4096, 0), op("read", error=True))
a.step("upstream fails a write", fails(errno.EIO, h.pwrite, b"x" * 4096, 2 * MIB),
       mutation("write", ok=False), ignore=["cache.extents"])
a.step("upstream fails a trim", fails(errno.EIO, h.trim, 4096, 3 * MIB), mutation("trim", ok=False),
       ignore=["cache.extents"])
a.step("upstream fails a zero", fails(errno.EIO, h.zero, 4096, 4 * MIB), mutation("write_zeroes", ok=False),
       ignore=["cache.extents"])
a.step("upstream fails a cache", fails(errno.EIO, h.cache, 4096, 0), op("cache", error=True))
# The range of the failed write is unknown: a miss. Its window fetch fails, then the
# exact request is tried once more (block_status_service.cpp): two upstream failures.
a.step("upstream fails a block status", fails(errno.EIO, block_status, h, 4096, 2 * MIB),
       {"client.requests.block_status": 1, "client.errors.block_status": 1, "block_status.misses": 1,
        "upstream.requests.block_status": 2, "upstream.errors.block_status": 2,
        "block_status.upstream_calls_saved": -1})
os.unlink(f"{T}/fail")
a.step("served again once upstream stops failing", lambda: h.pread(4096, 0), op("read"))
h.shutdown()
a.step("the client leaves", until=lambda s: s["client.connections_current"] == 0,
       values={"client.connections_current": 0})

# ================================================================================================
# B: an upstream whose FLUSH fails (nbdkit python plugin) and without multi-conn: 1 connection.
b = Proxy("b")
b.step("at start", values={"upstream.connections": 1})
hb = b.step("connect", lambda: client(b.uri), {"client.connections_total": 1, "client.connections_current": 1})
b.step("pwrite", lambda: hb.pwrite(b"b" * 4096, 0), mutation("write", spliced=False),  # one connection: libnbd
       ignore=["cache.extents"])
b.step("upstream fails a flush", fails(errno.EIO, hb.flush), op("flush", error=True))
b.step("and again", fails(errno.EIO, hb.flush), op("flush", error=True))
hb.shutdown()

# ================================================================================================
# C: --max-connections 1; upstream killed (-9) and restarted on the same socket.
c = Proxy("c")
hc = c.step("first client", lambda: client(c.uri), {"client.connections_total": 1},
            values={"client.connections_current": 1, "upstream.connections": 4})
c.step("second client refused", fails(None, lambda: client(c.uri)),
       {"client.connections_rejected": 1})
c.step("block status fills the cache", lambda: block_status(hc, 4096, 0),
       plus(op("block_status"), {"block_status.misses": 1, "upstream.block_status_latency_seconds.count": 1}),
       values={"cache.extents": positive})
up_pid = int(open(f"{T}/upc.pid").read())
c.step("upstream killed: connections 0, cache dropped", lambda: os.kill(up_pid, signal.SIGKILL),
       values={"upstream.connections": 0, "cache.extents": 0, "cache.memory_bytes": 0},
       until=lambda s: s["upstream.connections"] == 0)
c.step("a read while every connection is down", fails(errno.ESHUTDOWN, hc.pread, 4096, 0),
       op("read", error=True))


def restart_upstream():
    os.unlink(f"{T}/upc.sock")  # SIGKILL left it behind
    subprocess.run(["nbdkit", "-U", f"{T}/upc.sock", "-P", f"{T}/upc2.pid", "memory", "64M"], check=True)


c.step("upstream restarted: 4 reconnects", restart_upstream, {"upstream.reconnects": 4},
       values={"upstream.connections": 4}, until=lambda s: s["upstream.connections"] == 4)
c.step("served again", lambda: hc.pread(4096, 0), op("read"))
hc.shutdown()
c.step("the client leaves", until=lambda s: s["client.connections_current"] == 0,
       values={"client.connections_current": 0})
c.step("now another may connect", lambda: client(c.uri).shutdown(), {"client.connections_total": 1},
       until=lambda s: s["client.connections_current"] == 0)

# ================================================================================================
# D: eviction by stored window. upd: 4 GiB of 256 MiB extents, data and hole,zero in turn;
#    --cache-max-extents 8, --prefetch off (depth 0), --fetch-window 2G. README's capacity
#    rule: a window holds at most limit / (2 + depth) = 8 / 2 = 4 extents, sized from the
#    density seen so far; only that many extents of a reply are stored, those nearest the
#    query; past the limit (on extents or on stored windows) the least recently used
#    stored window goes. A window starts at the query's offset (rounded down to the block
#    size); every query here is on an extent boundary, so every window holds whole
#    extents, and W0 (ending in a hole) never coalesces with W1 (starting with data).
#  1. 0: a miss. Density unknown: the window is --fetch-window, [0, 2G), 8 extents. The
#     first 4 are stored: W0 = [0, 1G), 4 extents. Density 2G / 8 = 256 MiB per extent.
#  2. 1G: a miss: the reply's other 4 extents were not stored. Window 4 x 256 MiB = 1 GiB:
#     W1 = [1G, 2G). 8 extents in 2 windows: at the limit, nothing evicted.
#  3. 512M: a hit in W0, which becomes the most recently used window (W0, W1).
#  4. 2G: a miss, W2 = [2G, 3G): 12 extents, so the least recently used window goes: W1,
#     not the older W0. 8 extents, 1 eviction (W2, W0).
#  5. 0: a hit: W0 was kept (W0, W2).
#  6. 1G: a miss (W1 is gone): W1 stored again, W2 evicted (W1, W0).
#  The limit also counts stored windows: a 64 KiB write (aligned to the 64 KiB allocation
#  granularity, so it forgets nothing around it) stores its range as data, one stored
#  window; writes side by side coalesce into one extent but stay separate windows.
#  7. write at 3G (uncached): 9 extents in 3 windows: W0 (least recent) goes: 5 extents.
#  8. 6 more writes right after it: still 5 extents, now 8 windows: at the limit.
#  9. one more: 9 windows: W1 goes although there are only 5 extents: 1 extent left
#     (the 512 KiB written), in 8 windows.
# 10. 1G: a miss (W1 is gone; density still 256 MiB, so 1 GiB again): W1 stored: 5
#     extents, 9 windows: the first write's window (least recent) goes.
d = Proxy("d")
hd = d.step("connect", lambda: client(d.uri), {"client.connections_total": 1, "client.connections_current": 1})
miss = plus(op("block_status"), {"block_status.misses": 1, "upstream.block_status_latency_seconds.count": 1})
hit = {"client.requests.block_status": 1, "block_status.hits": 1}
d.step("1. miss at 0: a 2 GiB window, 8 extents, 4 of them stored", lambda: block_status(hd, 4096, 0), miss,
       values={"cache.extents": 4, "cache.max_extents": 8, "cache.memory_bytes": grew})
d.step("2. miss at 1G: a 1 GiB window of 4 extents stored, 8 cached, none evicted",
       lambda: block_status(hd, 4096, GIB), miss, values={"cache.extents": 8})
d.step("3. hit at 512M: window 0 is the most recently used", lambda: block_status(hd, 4096, 512 * MIB), hit)
d.step("4. miss at 2G: window 1 (least recently used) evicted, not window 0",
       lambda: block_status(hd, 4096, 2 * GIB), plus(miss, {"cache.evictions": 1}), values={"cache.extents": 8})
d.step("5. hit at 0: window 0 kept", lambda: block_status(hd, 4096, 0), hit)
d.step("6. miss at 1G: window 1 again, window 2 evicted", lambda: block_status(hd, 4096, GIB),
       plus(miss, {"cache.evictions": 1}), values={"cache.extents": 8})


def writes(h, offset, n):
    return lambda: [h.pwrite(b"d" * (64 * KIB), offset + i * 64 * KIB) for i in range(n)]


d.step("7. a 64 KiB write at 3G: 9 extents, window 0 evicted", writes(hd, 3 * GIB, 1),
       plus(mutation("write"), {"cache.evictions": 1}), values={"cache.extents": 5})
d.step("8. 6 writes beside it: 8 stored windows, 5 extents, none evicted", writes(hd, 3 * GIB + 64 * KIB, 6),
       mutation("write", 6), values={"cache.extents": 5})
d.step("9. one more: 9 stored windows: window 1 evicted, 1 extent left", writes(hd, 3 * GIB + 7 * 64 * KIB, 1),
       plus(mutation("write"), {"cache.evictions": 1}), values={"cache.extents": 1})
d.step("10. miss at 1G: window 1 stored, the first write's window evicted", lambda: block_status(hd, 4096, GIB),
       plus(miss, {"cache.evictions": 1}), values={"cache.extents": 5})
hd.shutdown()

# ================================================================================================
# E: the same upstream, --policy ttl=1s: a GiB cached more than 1 s ago expires at the next look-up.
e = Proxy("e", policy="ttl=1000ms")
he = e.step("connect", lambda: client(e.uri), {"client.connections_total": 1, "client.connections_current": 1})
e.step("fetched", lambda: block_status(he, 4096, 0), miss, values={"cache.extents": 4})
e.step("1.3 s later: expired, fetched again", lambda: (time.sleep(1.3), block_status(he, 4096, 0)),
       plus(miss, {"cache.expirations": 1}), values={"cache.extents": 4})
he.shutdown()

# ================================================================================================
# F: prefetch. null 512M, --fetch-window 256M: a scan an eighth into window 0 fetches
#    window 1 ahead (the last one, whatever the depth); a look-up there uses it.
f = Proxy("f")
hf = f.step("connect", lambda: client(f.uri), {"client.connections_total": 1, "client.connections_current": 1})
f.step("window 0 fetched", lambda: block_status(hf, 4096, 0), miss,
       values={"block_status.hit_rate": 0.0, "cache.extents": 1})
upstream_bs = f.last["upstream.requests.block_status"]
f.step("a hit an eighth in: window 1 prefetched", lambda: block_status(hf, 4096, 64 * MIB),
       {"client.requests.block_status": 1, "block_status.hits": 1, "cache.prefetches": 1,
        "upstream.requests.block_status": 1, "upstream.block_status_latency_seconds.count": 1,
        "block_status.upstream_calls_saved": 0},
       values={"block_status.hit_rate": 0.5},
       until=lambda s: s["upstream.requests.block_status"] == upstream_bs + 1)
f.step("a hit in window 1: the prefetch was used", lambda: block_status(hf, 4096, 300 * MIB),
       {"client.requests.block_status": 1, "block_status.hits": 1, "cache.prefetches_used": 1,
        "block_status.upstream_calls_saved": 1},
       values={"block_status.hit_rate": 2 / 3})
hf.shutdown()

# ================================================================================================
# L: the limit in force (cache.max_extents, bscache_cache_max_extents, the start-up log):
#    --cache-max-memory BYTES allows BYTES / 176 extents (README: 64 bytes per extent plus
#    112 per stored window); --cache-max-extents N; given both, the smaller wins.
limits_seen = {}


def check_limit(proxy, expected, how):
    s = proxy.snap()
    prom = proxy.last_metrics.get("bscache_cache_max_extents")
    logged = f"cache holds at most {expected} extents" in open(f"{T}/{proxy.name}.log").read()
    if s["cache.max_extents"] != expected or prom != expected or not logged:
        failure(f"{proxy.name}: {how}: cache.max_extents {s['cache.max_extents']}, "
                f"bscache_cache_max_extents {prom}, start-up log names it: {logged}; expected {expected}")
    else:
        limits_seen[proxy.name] = expected
        print(f"ok: {proxy.name}: {how}: the limit is {expected}")


check_limit(a, (256 << 20) // 176, "default --cache-max-memory 256M")
check_limit(Proxy("m"), (1 << 20) // 176, "--cache-max-memory 1M")
check_limit(Proxy("mx"), (1 << 20) // 176, "--cache-max-memory 1M --cache-max-extents 6000: memory is smaller")
x3 = Proxy("x3")
check_limit(x3, 3, "--cache-max-memory 1M --cache-max-extents 3: extents are smaller")
x4 = Proxy("x4")
check_limit(x4, 4, "--cache-max-extents 4")
check_limit(d, 8, "--cache-max-extents 8")
if len(limits_seen) == 6 and len(set(limits_seen.values())) > 1:
    covered.add("cache.max_extents")

# x3: a limit of 3 cannot keep a window of 2 beside the one being read (3 / 2 < 2): every
#    miss goes upstream as it came (REQ_ONE or not, the same range), nothing is cached,
#    and each is counted in cache.bypassed; the first is logged.
GIB0 = [256 * MIB, 0, 256 * MIB, 3, 256 * MIB, 0, 256 * MIB, 3]  # upd's first GiB: data, hole, ...
h3 = x3.step("connect", lambda: client(x3.uri), {"client.connections_total": 1, "client.connections_current": 1})
bypass = plus(miss, {"cache.bypassed": 1})
x3.step("a miss forwarded unchanged: 1 GiB, 4 extents", answers("x3", lambda: block_status(h3, GIB, 0), GIB0),
        bypass, values={"cache.extents": 0})
x3.step("with REQ_ONE: forwarded unchanged, 1 extent",
        answers("x3", lambda: block_status_req_one(h3, GIB, 0), GIB0[:2]), bypass, values={"cache.extents": 0})
x3.step("the same query again: nothing was kept, bypassed again",
        answers("x3", lambda: block_status(h3, GIB, 0), GIB0), bypass, values={"cache.extents": 0})
if open(f"{T}/x3.log").read().count("forwarded upstream as they come") != 1:
    failure("x3: the bypass is not logged exactly once")
h3.shutdown()

# x4: a limit of 4 keeps windows of 4 / 2 = 2 extents (prefetch on, but the depth shrinks to
#    0 so windows keep 2): no bypass. The window is the whole 4 GiB (density unknown), its
#    first 2 extents are stored, a hit in the second one sends no prefetch.
h4 = x4.step("connect", lambda: client(x4.uri), {"client.connections_total": 1, "client.connections_current": 1})
x4.step("a miss is cached, not bypassed: 2 extents stored", lambda: block_status(h4, 4096, 0), miss,
        values={"cache.extents": 2})
x4.step("a hit in the second extent; no prefetch at depth 0", lambda: block_status(h4, 4096, 300 * MIB), hit)
h4.shutdown()

# ================================================================================================
# N: upstream refuses block status longer than 1 MiB (python plugin, 16 MiB, all hole): the
#    window fetch for a miss ([0, 16M), --fetch-window clipped to the export) fails, and the
#    exact query is asked once more and answered (README: "a failed fetch" costs one extra
#    call). Two upstream calls for one client call: upstream_calls_saved goes to -1, then -2.
n = Proxy("n")
hn = n.step("connect", lambda: client(n.uri), {"client.connections_total": 1, "client.connections_current": 1})
costly = plus(op("block_status"), {"upstream.requests.block_status": 1, "upstream.errors.block_status": 1,
                                   "block_status.misses": 1, "upstream.block_status_latency_seconds.count": 1})
n.step("the window is refused, the exact query answered: one call lost",
       answers("n", lambda: block_status(hn, 4096, 0), [4096, 3]), costly,
       values={"block_status.upstream_calls_saved": -1, "cache.extents": 0, "block_status.hit_rate": 0.0})
n.step("the same again: nothing cached, -2",
       answers("n", lambda: block_status(hn, 4096, 0), [4096, 3]), costly,
       values={"block_status.upstream_calls_saved": -2, "cache.extents": 0})
hn.shutdown()

# ================================================================================================
# G: shutdown. A read is in flight (upstream delays reads 4 s) when SIGTERM arrives; a FLUSH
#    sent after it is refused (ESHUTDOWN); the read completes; the stats file written at exit
#    has it all.
g = Proxy("g")
hg = g.step("connect", lambda: client(g.uri), {"client.connections_total": 1, "client.connections_current": 1})
before = g.last
buf = nbd.Buffer(4096)
cookie = hg.aio_pread(buf, 0)
time.sleep(0.3)
os.unlink(g.stats)  # the one written at exit must be read
os.kill(g.pid, signal.SIGTERM)
for _ in range(200):
    if "shutting down" in open(f"{T}/g.log").read():
        break
    time.sleep(0.025)
fails(errno.ESHUTDOWN, hg.flush)()
while not hg.aio_command_completed(cookie):
    hg.poll(1000)
for _ in range(400):
    if not os.path.exists(f"{T}/g.pid"):  # removed after the stats file is written
        break
    time.sleep(0.025)
else:
    failure("g: bscache did not exit after SIGTERM")
g.stats_at_exit = flatten(json.load(open(g.stats)))
# Every upstream connection is closed before the stats file is written at exit.
if g.stats_at_exit["upstream.connections"] != 0:
    failure(f"g: stats file at exit says {g.stats_at_exit['upstream.connections']} upstream connections, expected 0")
else:
    print("ok: g: no upstream connection is up in the stats file at exit")
expected = plus(op("read"), op("flush", upstream=False, error=True), {"client.connections_current": -1})
bad = [f"{k} moved by {g.stats_at_exit[k] - before[k]}, expected {expected.get(k, 0)}"
       for k in KEYS if k not in NON_COUNTERS and k not in DERIVED and k != "upstream.connections"
       and g.stats_at_exit[k] - before[k] != expected.get(k, 0)]
for problem in bad:
    failure(f"g: refused during shutdown: {problem}")
if not bad:
    covered.update(k for k in expected if k.startswith("client.errors"))
    print("ok: g: a FLUSH during shutdown is refused and counted; the stats file at exit has it")

# ================================================================================================
not_moved = [k for k in KEYS if k not in NON_COUNTERS and k not in covered]
if not_moved:
    failure(f"README keys never seen to move under an expectation: {not_moved}")
else:
    print(f"ok: all {len(KEYS) - len(NON_COUNTERS)} README counters moved as expected; "
          f"{len(METRICS)} README metric families checked against /metrics")
if failures:
    sys.exit(f"{len(failures)} failure(s)")
