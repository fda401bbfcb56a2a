#!/usr/bin/env python3
"""User-space instructions and allocations per request, counted by callgrind: repeatable.

    bash benches/load/profile.sh --instructions [requests]

CPU time per request moves by ±10 % between runs on a shared two-core machine; instruction
counts do not, so a change of 1 % in the proxy's own work shows. Each contender runs under
`valgrind --tool=callgrind` (upstream and emulator run natively), takes 2,000 warm-up requests,
has its counters zeroed, then serves `requests` HTTP/1.1 keep-alive requests from
`h2load --h1 -c8`. Its counters are dumped after them, so start-up and warm-up are not counted.

Contenders: the proxy with its access log on and off, with route limits that never refuse (the
limiter's cost), and the bare-hyper floor
(examples/bench_hyper_floor.rs). Kernel time is not counted: this measures the user-space work
that sets the proxy apart from the floor, not the syscalls they share.

Prints instructions and `malloc` calls per request, then the proxy's most expensive functions
(inclusive, per request). The dumps stay in the work directory for `callgrind_annotate`.
"""

import glob
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402

bench.use_binaries(os.environ.get("PROFILE_TARGET", os.path.join(bench.ROOT, "target", "release")))
WARM_UP = 2000
TOP = 25


def load(url, n):
    out = subprocess.run(["h2load", "--h1", "-n", str(n), "-c", "8", url],
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


def measure(workdir, name, process, url, n):
    load(url, WARM_UP)
    subprocess.run(["callgrind_control", "--zero", str(process.pid)], capture_output=True,
                   check=True)
    load(url, n)
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
    return path, total / n, malloc_calls(path) / n


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
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    env = bench.Env(tempfile.mkdtemp(prefix="sap-instructions-"))

    def callgrind(name):
        return ["valgrind", "--tool=callgrind", "--quiet",
                f"--callgrind-out-file={env.workdir}/cg.{name}.%p"]

    try:
        bench.start_upstream(env, 1)
        emulator = bench.start_emulator(env, "emu", 86_400)
        env.token = bench.fetch_static_token(emulator)
        results = []
        variants = (("proxy", False, False, "log on"), ("proxy-quiet", True, False, "log off"),
                    ("proxy-limited", False, True, "log on, route limits that never refuse"))
        for name, quiet, limits, label in variants:
            proxy, port = bench.start_proxy(env, name, emulator, quiet=quiet, wrap=callgrind(name),
                                            limits=limits)
            url = f"http://127.0.0.1:{port}{bench.CLIENT_PATH}"
            results.append((f"sitecore-auth-proxy ({label})",
                            *measure(env.workdir, name, proxy, url, n)))
        floor, port, _ = bench.start_floor(env, wrap=callgrind("floor"))
        results.append(("hyper floor (no proxy logic)",
                        *measure(env.workdir, "floor", floor, f"http://127.0.0.1:{port}"
                                 f"{bench.CLIENT_PATH}", n)))

        print(f"{n} requests, `h2load --h1 -c8`, after {WARM_UP} warm-up requests\n")
        print("| contender | instructions/request | malloc/request |")
        print("|---|---|---|")
        for label, _, ir, mallocs in results:
            print(f"| {label} | {ir:,.0f} | {mallocs:.1f} |")
        print(f"\nThe proxy's functions (log on), inclusive instructions per request, from "
              f"{results[0][1]}:\n")
        for cost, fn in top_functions(results[0][1], n):
            print(f"{cost:9,.0f}  {fn}")
    finally:
        bench.stop_all()


if __name__ == "__main__":
    main()
