#!/usr/bin/env python3
"""User-space instructions and allocations per request, counted by callgrind: repeatable.

    bash benches/load/profile.sh --instructions [requests] [--variants LIST] [--proxy-before BIN]

CPU time per request moves by ±10 % between runs on a shared two-core machine; instruction
counts do not, so a change of 1 % in the proxy's own work shows. Each contender runs under
`valgrind --tool=callgrind` (upstream and emulator run natively), takes 2,000 warm-up requests,
has its counters zeroed, then serves `requests` HTTP/1.1 keep-alive requests from
`h2load --h1 -c8`. Its counters are dumped after them, so start-up and warm-up are not counted.

Contenders: the proxy with its access log on and off, with route limits that never refuse (the
limiter's cost), and the bare-hyper floor
(examples/bench_hyper_floor.rs). Kernel time is not counted: this measures the user-space work
that sets the proxy apart from the floor, not the syscalls they share.

`--variants` (comma-separated, default `default`) adds contenders:
  growth   the proxy with 10 clients and 10 routes, 1,000 clients and 10 routes, and 10 clients
           and 1,000 routes (scenarios.py's `growth`), loaded through every route in turn
           (`h2load -i`) with one client key (`x-api-key: bench-key-7`);
  growth-spread  the same proxies loaded as the `growth` scenario loads them: `wrk -c8` with
           spread.lua (a random route and client key per request) for 30 s, the requests
           counted by the upstream, so every client's and route's metric series is reached;
  tracing  the proxy with its admin listener and no [telemetry], with `sample_ratio` 0.01 and 1.0
           exporting to examples/bench_otlp_sink.rs (the dump waits 5 s after the load, so the
           export of its spans is counted), and with `--proxy-before BIN` that build without
           [telemetry] (one from before it existed);
  fleet    the proxy with route limits that never refuse, without and with [cluster] (a
           redis-server of the run's own, the default sync_interval of 100 ms): the fleet's
           background sync, spread over the requests served meanwhile, and anything
           [cluster] adds to a request's path. `--proxy-before BIN` adds that build's limited
           row (for a change to the limiter).
Export happens on the proxy's own threads, so it is in the counts.

Prints instructions and `malloc` calls per request, then the proxy's most expensive functions
(inclusive, per request). The dumps stay in the work directory for `callgrind_annotate`.
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402
import scenarios  # noqa: E402
import setups  # noqa: E402

bench.use_binaries(os.environ.get("PROFILE_TARGET", os.path.join(bench.ROOT, "target", "release")))
WARM_UP = 2000
# The `growth-spread` load's length: about 20,000 requests at callgrind's pace.
SPREAD_SECONDS = 30
TOP = 25


def load(url, n, args=()):
    """`args`: more h2load options; with `-i FILE` the URIs come from FILE and `url` is None."""
    out = subprocess.run(["h2load", "--h1", "-n", str(n), "-c", "8", *args, *([url] if url else [])],
                         capture_output=True, text=True, check=True).stdout
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
    ok = re.search(r"status codes: (\d+) 2xx", out)
    if not (done and ok and int(done.group(1)) == n and int(ok.group(1)) == n):
        raise RuntimeError(f"{url}: not all {n} requests succeeded:\n{out}")


def annotate(path, *args):
    return subprocess.run(["callgrind_annotate", "--threshold=100", *args, path],
                          capture_output=True, text=True, check=True).stdout


def malloc_calls(path):
    """Calls into glibc's `malloc`, summed over its callers in the caller tree."""
    calls, callers = 0, []
    for line in annotate(path, "--tree=caller").splitlines():
        if "<" in line:
            callers.append(line)
        elif "*" in line:
            if re.search(r":malloc \[", line):
                calls += sum(int(m.group(1).replace(",", ""))
                             for m in (re.search(r"\(([\d,]+)x\)", c) for c in callers) if m)
            callers = []
        else:
            callers = []
    return calls


def spread(env, url, seconds, routes, keys):
    """wrk with spread.lua (a random route and client key per request) for `seconds`; returns
    how many requests the upstream answered meanwhile."""
    served0 = bench.upstream_served(env)
    with scenarios.spread_env(routes, keys):
        subprocess.run(["wrk", "-t1", "-c8", f"-d{seconds}s", "-s", scenarios.SPREAD_LUA, url],
                       capture_output=True, check=True)
    return bench.upstream_served(env) - served0


def measure(workdir, name, process, url, n, args=(), settle=0.0, spread_load=None):
    """`spread_load(seconds)` replaces h2load: the requests are then those it reports."""
    if spread_load:
        spread_load(10)
    else:
        load(url, WARM_UP, args)
    subprocess.run(["callgrind_control", "--zero", str(process.pid)], capture_output=True,
                   check=True)
    if spread_load:
        n = spread_load(SPREAD_SECONDS)
    else:
        load(url, n, args)
    time.sleep(settle)
    before = set(glob.glob(os.path.join(workdir, f"cg.{name}.*")))
    subprocess.run(["callgrind_control", "--dump=measured", str(process.pid)],
                   capture_output=True, check=True)
    dumps = set(glob.glob(os.path.join(workdir, f"cg.{name}.*"))) - before
    if len(dumps) != 1:
        raise RuntimeError(f"{name}: expected one new callgrind dump, found {sorted(dumps)}")
    path = dumps.pop()
    with open(path) as f:
        total = next(int(l.split()[1]) for l in f if l.startswith("totals:"))
    bench.stop(process)
    print(f"{name}: {n} requests measured", file=sys.stderr, flush=True)
    return path, total / n, malloc_calls(path) / n, n


def top_functions(path, n):
    """The proxy's own functions by inclusive instructions per request."""
    rows = []
    for line in annotate(path, "--inclusive=yes").splitlines():
        m = re.match(r"\s*([\d,]+) \([\d. %]+\)\s+(\S.*)$", line)
        if m and "sitecore_auth_proxy::" in m.group(2):
            name = m.group(2).split(":", 1)[1].split(" [")[0]
            rows.append((int(m.group(1).replace(",", "")) / n, name))
    seen, out = set(), []
    for cost, fn in rows:
        if fn not in seen:
            seen.add(fn)
            out.append((cost, fn))
    return out[:TOP]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("requests", type=int, nargs="?", default=20_000)
    ap.add_argument("--variants", default="default",
                    help="comma-separated: default, growth, growth-spread, tracing, fleet")
    ap.add_argument("--proxy-before", help="tracing and fleet: also count this build (tracing: one from "
                                           "before [telemetry])")
    a = ap.parse_args()
    n = a.requests
    variants = a.variants.split(",")
    env = bench.Env(tempfile.mkdtemp(prefix="sap-instructions-"))

    def callgrind(name):
        return ["valgrind", "--tool=callgrind", "--quiet",
                f"--callgrind-out-file={env.workdir}/cg.{name}.%p"]

    try:
        bench.start_upstream(env, 1)
        emulator = bench.start_emulator(env, "emu", 86_400)
        env.token = bench.fetch_static_token(emulator)
        results = []
        if "default" in variants:
            for name, quiet, limits, label in (
                    ("proxy", False, False, "log on"), ("proxy-quiet", True, False, "log off"),
                    ("proxy-limited", False, True, "log on, route limits that never refuse")):
                proxy, port = bench.start_proxy(env, name, emulator, quiet=quiet, wrap=callgrind(name),
                                                limits=limits)
                url = f"http://127.0.0.1:{port}{bench.CLIENT_PATH}"
                results.append((f"sitecore-auth-proxy ({label})",
                                *measure(env.workdir, name, proxy, url, n)))
        if "growth" in variants:
            for clients, routes in ((10, 10), (1000, 10), (10, 1000)):
                name = f"proxy-{clients}c-{routes}r"
                text = lambda pt, c=clients, r=routes: setups.proxy_text(  # noqa: E731
                    pt, emulator, [(f"/r{i}", f"http://127.0.0.1:{env.upstream_port}/b{i}") for i in range(r)],
                    clients=c)
                proxy, port = bench.start_proxy(env, name, emulator, wrap=callgrind(name), config=text)
                uris = scenarios.write_uris(env, name, port, routes)
                results.append((f"sitecore-auth-proxy ({clients} clients, {routes} routes)",
                                *measure(env.workdir, name, proxy, None, n,
                                         ["-i", uris, "-H", "x-api-key: bench-key-7"])))
        if "growth-spread" in variants:
            for clients, routes in ((10, 10), (1000, 10), (10, 1000)):
                name = f"proxy-spread-{clients}c-{routes}r"
                text = lambda pt, c=clients, r=routes: setups.proxy_text(  # noqa: E731
                    pt, emulator, [(f"/r{i}", f"http://127.0.0.1:{env.upstream_port}/b{i}") for i in range(r)],
                    clients=c)
                proxy, port = bench.start_proxy(env, name, emulator, wrap=callgrind(name), config=text)
                url = f"http://127.0.0.1:{port}/"
                results.append((f"sitecore-auth-proxy ({clients} clients, {routes} routes, spread.lua)",
                                *measure(env.workdir, name, proxy, url, n, spread_load=lambda s, u=url, c=clients,
                                         r=routes: spread(env, u, s, r, c))))
        if "tracing" in variants:
            out = env.path("sink.out")
            bench.spawn([bench.SINK_BIN, "127.0.0.1:0"], open(out, "w"))
            sink = bench.read_first_line(out).split()[1]
            rows = [("no [telemetry]", None, None)]
            if a.proxy_before:
                rows.append((f"{os.path.basename(a.proxy_before)}, before [telemetry]", None, a.proxy_before))
            rows += [("tracing 0.01", 0.01, None), ("tracing 1.0", 1.0, None)]
            for label, ratio, binary in rows:
                name = "proxy-trace-" + ("off" if ratio is None else str(ratio)) + ("-before" if binary else "")
                telemetry = ("" if ratio is None else
                             f'[telemetry]\notlp_endpoint = "http://{sink}"\nsample_ratio = {ratio}\n')
                extra = f'[admin]\nlisten = "127.0.0.1:{bench.free_port()}"\n\n{telemetry}'
                text = lambda pt, x=extra: setups.proxy_text(  # noqa: E731
                    pt, emulator, [("/deploy", f"http://127.0.0.1:{env.upstream_port}/base")], extra=x)
                proxy, port = bench.start_proxy(env, name, emulator, wrap=callgrind(name), config=text,
                                                binary=binary)
                url = f"http://127.0.0.1:{port}{bench.CLIENT_PATH}"
                results.append((f"sitecore-auth-proxy ({label})",
                                *measure(env.workdir, name, proxy, url, n,
                                         settle=5.0 if ratio else 0.0)))
            with urllib.request.urlopen(f"http://{sink}/counters", timeout=10) as r:
                print(f"spans the sink received (all tracing rows, warm-up included): {r.read().decode()}\n")
        if "fleet" in variants:
            redis = setups.Redis(env, "redis")
            rows = [("route limits, no [cluster]", "", None),
                    ("route limits, [cluster]", f'[cluster]\nredis_url = "{redis.url()}"\n', None)]
            if a.proxy_before:
                rows.append((f"{os.path.basename(a.proxy_before)}, route limits", "", a.proxy_before))
            for label, extra, binary in rows:
                name = "proxy-fleet-" + ("on" if extra else "off") + ("-before" if binary else "")
                text = lambda pt, x=extra: setups.proxy_text(  # noqa: E731
                    pt, emulator, [("/deploy", f"http://127.0.0.1:{env.upstream_port}/base")], extra=x,
                    route_extra=bench.NEVER_REFUSING_LIMITS)
                proxy, port = bench.start_proxy(env, name, emulator, wrap=callgrind(name), config=text,
                                                binary=binary)
                url = f"http://127.0.0.1:{port}{bench.CLIENT_PATH}"
                commands, started = redis.commands(), time.monotonic()
                results.append((f"sitecore-auth-proxy ({label})", *measure(env.workdir, name, proxy, url, n)))
                if extra:
                    # Warm-up and measured load together.
                    sent = redis.commands() - commands
                    print(f"{label}: {sent} Redis commands in {time.monotonic() - started:.1f} s "
                          f"(warm-up included)\n", flush=True)
        if "default" in variants:
            floor, port, _ = bench.start_floor(env, wrap=callgrind("floor"))
            results.append(("hyper floor (no proxy logic)",
                            *measure(env.workdir, "floor", floor, f"http://127.0.0.1:{port}"
                                     f"{bench.CLIENT_PATH}", n)))

        print(f"{n} requests, `h2load --h1 -c8`, after {WARM_UP} warm-up requests (growth-spread: "
              f"wrk for {SPREAD_SECONDS} s after 10 s, the requests the upstream counted)\n")
        print("| contender | instructions/request | malloc/request |")
        print("|---|---|---|")
        for label, _, ir, mallocs, _ in results:
            print(f"| {label} | {ir:,.0f} | {mallocs:.1f} |")
        # The first row's functions; with other variants, every proxy row's.
        shown = results[:1] if variants == ["default"] else [r for r in results if "floor" not in r[0]]
        for label, path, _, _, requests in shown:
            print(f"\n{label}: the proxy's functions, inclusive instructions per request, from {path}:\n")
            for cost, fn in top_functions(path, requests):
                print(f"{cost:9,.0f}  {fn}")
    finally:
        bench.stop_all()


if __name__ == "__main__":
    main()
