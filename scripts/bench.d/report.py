"""The summary of scripts/bench: every figure next to its baseline, the ratio
and the target, from criterion's estimates (only those written by this run)
and the wrk summaries of the HTTP rounds.

    report.py CRITERION_DIR STAMP_FILE RESULTS_DIR ROUNDS WRK_LOAD
"""

import glob
import json
import os
import statistics
import sys

root, stamp_file, results, rounds, wrk_load = sys.argv[1:6]
stamp = os.path.getmtime(stamp_file)
rounds = int(rounds)


def estimate(path):
    """(mean ns per iteration, elements per iteration) of one criterion id."""
    est = os.path.join(root, path, "new", "estimates.json")
    if not os.path.exists(est) or os.path.getmtime(est) < stamp:
        return None
    with open(est) as f:
        mean = json.load(f)["mean"]["point_estimate"]
    elements = 1
    meta = os.path.join(root, path, "new", "benchmark.json")
    if os.path.exists(meta):
        with open(meta) as f:
            throughput = json.load(f).get("throughput") or {}
        elements = throughput.get("Elements", 1)
    return mean, elements


def fmt_time(ns):
    if ns is None:
        return "not run"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.2f} {unit}"
    return f"{ns:.1f} ns"


def fmt_rate(rate, unit="/s"):
    if rate is None:
        return "not run"
    for prefix, scale in (("M", 1e6), ("k", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.2f} {prefix}{unit}"
    return f"{rate:.0f} {unit}"


def per_second(est):
    return None if est is None else est[1] * 1e9 / est[0]


table = []
notes = []


def row(name, figure, baseline_name, baseline, ratio, target, verdict):
    table.append((name, figure, baseline_name, baseline, ratio, target, verdict))


def time_row(name, path, base_name, base_path, target=None, note=""):
    """Time per operation against a baseline: ratio = time / baseline time."""
    est, base = estimate(path), estimate(base_path)
    ratio, verdict = "-", ""
    if est and base:
        r = est[0] / base[0]
        ratio = f"{r:.2f}x"
        if target:
            verdict = "ok" if r <= target else "MISSED"
    if est is None and base is None:
        return
    row(name, fmt_time(est and est[0]), base_name, fmt_time(base and base[0]), ratio,
        f"<= {target:.2f}x" if target else (note or "-"), verdict)


def share_row(name, path, base_name, base_path, target):
    """Throughput as a share of the baseline's."""
    est, base = estimate(path), estimate(base_path)
    if est is None and base is None:
        return
    ratio, verdict = "-", ""
    if est and base:
        r = per_second(est) / per_second(base)
        ratio = f"{r:.1%}"
        verdict = "ok" if r >= target else "MISSED"
    row(name, fmt_rate(per_second(est)), base_name, fmt_rate(per_second(base)), ratio,
        f">= {target:.0%}", verdict)


def absolute_row(name, path, target, unit):
    est = estimate(path)
    if est is None:
        return
    rate = per_second(est)
    r = rate / target
    row(name, fmt_rate(rate, unit), "target", fmt_rate(target, unit), f"{r:.2f}x",
        ">= 1.00x", "ok" if r >= 1 else "MISSED")


# ---------------------------------------------------------------- validate
floor = "validate/floor_sha256_plus_hashmap"
time_row("validate: parse + checksum", "validate/parse_and_checksum", "SHA-256 + hash map", floor)
time_row("validate: engine, no policy (memory store)", "validate/engine_no_policy",
         "SHA-256 + hash map", floor, 3.0)
time_row("validate: engine, 10 CIDRs + 10 origins", "validate/engine_policy_10_cidrs_10_origins",
         "SHA-256 + hash map", floor, 3.0)
# The `cache` bench measures its own floor in the same run.
time_row("validate: cached engine, SQLite behind the cache", "cache/engine_cached_sqlite",
         "SHA-256 + hash map", "cache/floor_sha256_plus_hashmap", 2.0)
time_row("validate: cached engine (same figure)", "cache/engine_cached_sqlite",
         "SHA-256 + map of the cached keys", "cache/floor_sha256_plus_hashmap_of_keys", None)
memory = os.path.join(results, "cache_memory.txt")
if os.path.exists(memory):
    with open(memory) as f:
        row("memory per cached key", f.read().strip().split(" ")[0] + " B", "-", "-", "-", "-",
            "")


# ---------------------------------------------------------------- stores, scale
def counts(store):
    found = []
    for path in glob.glob(os.path.join(root, store, "engine_validate", "*")):
        n = os.path.basename(path)
        if n.isdigit() and estimate(f"{store}/engine_validate/{n}"):
            found.append(int(n))
    return sorted(found)


for store in ("sqlite", "postgres"):
    for n in counts(store):
        share_row(f"stores: {store} uncached validate, {n} keys",
                  f"{store}/engine_validate/{n}", "plain select by hash",
                  f"{store}/baseline_select_by_hash/{n}", 0.70)
for store in ("sqlite", "postgres"):
    found = counts(store)
    if len(found) >= 2:
        small, large = found[0], found[-1]
        time_row(f"scale: {store} validate, {large} keys",
                 f"{store}/engine_validate/{large}", f"{small} keys",
                 f"{store}/engine_validate/{small}", 1.20)
        time_row(f"scale: {store} plain select, {large} keys",
                 f"{store}/baseline_select_by_hash/{large}", f"{small} keys",
                 f"{store}/baseline_select_by_hash/{small}", note="reference")

# ---------------------------------------------------------------- usage
for store, target in (("sqlite", 100_000), ("postgres", 50_000)):
    for n in (1000, 5000):
        absolute_row(f"usage: {store} Store::insert_usage, {n}-record batches",
                     f"usage_{store}/insert_usage/{n}", target, "rec/s")
    absolute_row(f"usage: {store} through UsageWriter, 100k records",
                 f"usage_{store}/usage_writer_100k", target, "rec/s")

# ---------------------------------------------------------------- limits
base = "limits/policy_without_limits"
time_row("limits: rate limit + both quotas, local", "limits/local_rate_limit_and_quotas",
         "same policy, no limits", base)
time_row("limits: rate limit only, local", "limits/local_rate_limit_only",
         "same policy, no limits", base)
time_row("limits: quotas only, counted in process", "limits/local_quotas_only",
         "same policy, no limits", base)
time_row("limits: rate limit + quotas counted in the store",
         "limits/local_rate_limit_and_quotas_counted_in_store", "same policy, no limits", base)
time_row("limits: rate limit + quotas, Redis", "limits/redis_rate_limit_and_quotas",
         "same policy, no limits", base, note="reported")
# The same, paired: alternating slices of validations, median ratio.
paired = os.path.join(results, "limits_paired.txt")
if os.path.exists(paired):
    with open(paired) as f:
        for line in f:
            name, subject, base_ns, ratio = line.split()
            ratio = float(ratio)
            target = name == "local_rate_limit_and_quotas"
            verdict = ("ok" if ratio <= 1.25 else "MISSED") if target else ""
            row(f"limits (paired): {name}", f"{float(subject):.0f} ns", "same policy, no limits",
                f"{float(base_ns):.0f} ns", f"{ratio:.2f}x", "<= 1.25x" if target else "-", verdict)


# ---------------------------------------------------------------- HTTP
def wrk(name):
    path = os.path.join(results, f"{name}.json")
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    with open(path) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def http_rows(label, subject, subject_name, base, base_name, targets):
    pairs = [(wrk(f"{subject}.r{r}"), wrk(f"{base}.r{r}")) for r in range(1, rounds + 1)]
    pairs = [(s, b) for s, b in pairs if s and b]
    if not pairs:
        return
    ratios = [s["rps"] / b["rps"] for s, b in pairs]
    for s, b in pairs:
        if s["non2xx"] or s["errors"] or b["non2xx"] or b["errors"]:
            notes.append(f"{label}: non-2xx answers or socket errors in a round: "
                         f"{subject_name} {s['non2xx']}/{s['errors']}, "
                         f"{base_name} {b['non2xx']}/{b['errors']}")
    ratio = statistics.mean(ratios)
    each = ", ".join(f"{r:.1%}" for r in ratios)
    srps = statistics.mean(s["rps"] for s, _ in pairs)
    brps = statistics.mean(b["rps"] for _, b in pairs)
    for target in targets or (None,):
        row(f"{label}: {subject_name} req/s", fmt_rate(srps, "req/s"), base_name,
            fmt_rate(brps, "req/s"), f"{ratio:.1%} (rounds: {each})",
            f">= {target:.0%}" if target else "reported",
            ("ok" if ratio >= target else "MISSED") if target else "")
    lat = lambda xs, k: statistics.median(x[k] for x in xs) / 1000  # noqa: E731
    subj, basel = [s for s, _ in pairs], [b for _, b in pairs]
    for k, what in (("p50_us", "p50"), ("p99_us", "p99")):
        row(f"{label}: {subject_name} latency {what}", f"{lat(subj, k):.2f} ms", base_name,
            f"{lat(basel, k):.2f} ms", f"{lat(subj, k) / max(lat(basel, k), 1e-9):.2f}x", "-", "")


http_rows("middleware", "mw_cached", "KeysmithLayer + cache + usage (SQLite)", "mw_cached_plain",
          "same handler unprotected", (0.80,))
http_rows("middleware", "mw_layer", "KeysmithLayer + cache, no usage recorded", "mw_layer_plain",
          "same handler unprotected", (0.85,))
http_rows("middleware", "mw_uncached", "KeysmithLayer, no cache, + usage (SQLite)",
          "mw_uncached_plain", "same handler unprotected", ())
for mode in ("cached", "uncached"):
    usage_line = os.path.join(results, f"mw_{mode}_usage.txt")
    if os.path.exists(usage_line):
        with open(usage_line) as f:
            notes.append(f"middleware ({mode}) usage recording: " + f.read().strip())
http_rows("rest", "rest_validate", "POST /v1/keys/validate", "rest_healthz",
          "GET /healthz", (0.60,))

# ---------------------------------------------------------------- print
header = ("figure", "value", "baseline", "baseline value", "ratio", "target", "")
widths = [max(len(r[i]) for r in [header] + table) for i in range(len(header))]
print()
print("Summary. Ratios are against the baseline measured in the same run: time")
print("ratios for criterion latencies (lower is better), throughput shares for")
print(f"rates (higher is better). HTTP: wrk {wrk_load} --latency, mean of {rounds}")
print("alternating rounds, latencies are the median over rounds.")
print()
for n, r in enumerate([header] + table):
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if n == 0:
        print("  ".join("-" * w for w in widths))
for note in notes:
    print(f"note: {note}")
