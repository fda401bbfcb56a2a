#!/usr/bin/env python3
"""Where a resumed TLS handshake's CPU goes: nginx, the proxy and the hyper floor.

    python3 benches/load/handshakes.py [--seconds 8] [--no-perf]

Under the `resume` load of the `tls-handshake` scenario (wrk -t1 -c16 with `Connection: close`:
a new TCP connection and a resumed TLS 1.3 handshake per request), one contender at a time:
- CPU per connection from /proc, and its system part;
- voluntary and involuntary context switches per connection, from /proc/<pid>/task/*/status
  (a voluntary one is a thread going to sleep: an epoll_wait with nothing ready);
- the machine's idle time (all cores, from /proc/stat), and wrk's own CPU per connection and
  share of a core: wrk is one thread, so at 100 % the rate is what its CPU per connection
  allows, and that depends on what the server makes it do (a TLS 1.2 resumption has no key
  exchange, a TLS 1.3 one has one; SHA-384 suites cost it more than SHA-256 on this CPU);
- with perf (cpu-clock, the only event this VM has), CPU per connection by symbol.
The proxy runs twice: with a worker per core, and with one (SITECORE_PROXY_WORKERS=1).
It uses the binaries run.sh builds (target/release); BENCHMARKS.md has the results.
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as b  # noqa: E402
import scenarios  # noqa: E402
import setups  # noqa: E402

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")
# A symbol is listed when it costs at least this much per connection.
MIN_SYMBOL_US = 1.0


def user_system(pid):
    """utime and stime of `pid` and its descendants (nginx's workers), in µs."""
    user, system = b.user_system_ticks(pid)
    return user * TICK_US, system * TICK_US


def switches(pid):
    """Voluntary and involuntary context switches of every thread of `pid` and its descendants."""
    voluntary = involuntary = 0
    for p in b.process_tree(pid):
        for status in glob.glob(f"/proc/{p}/task/*/status"):
            try:
                with open(status) as f:
                    text = f.read()
            except OSError:
                continue
            voluntary += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", text, re.M).group(1))
            involuntary += int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", text, re.M).group(1))
    return voluntary, involuntary


def where(dso, kind):
    """The kernel, a shared library, or the contender's own binary (the proxy's and the floor's
    are one row: the same rustls, aws-lc, tokio and hyper)."""
    if kind == "k":
        return "kernel"
    if dso.startswith(("lib", "[")):
        return dso
    return "nginx" if dso == "nginx" else "the binary"


def machine_ticks():
    """Idle (with iowait) and total clock ticks of the whole machine."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)


def symbols(data, conns):
    """(µs per connection, kind, symbol) from a perf recording, the costliest first."""
    out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,sym",
                          "-g", "none"], capture_output=True, text=True).stdout
    ns = int(re.search(r"Event count \(approx.\): (\d+)", out).group(1))
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*\S)", line)
        if m:
            us = float(m.group(1)) / 100 * ns / 1000 / conns
            rows.append((us, where(m.group(2), m.group(3)), m.group(4)))
    return ns / 1000 / conns, rows


def measure(name, pid, url, seconds, perf, workdir):
    load = ["wrk", "-t1", f"-c{scenarios.RESUME_CONNS}", "-H", "Connection: close"]
    subprocess.run([*load, "-d3s", url], capture_output=True, check=True)
    wrk = subprocess.Popen([*load, f"-d{seconds + 2}s", url], stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    (u0, s0), (v0, i0), (idle0, all0) = user_system(pid), switches(pid), machine_ticks()
    client0 = sum(user_system(wrk.pid))
    served0 = time.monotonic()
    data = os.path.join(workdir, name.replace(", ", "-").replace(" ", "-") + ".perf")
    if perf:
        # nginx: its workers (perf -p does not follow children).
        targets = [str(p) for p in b.process_tree(pid)]
        subprocess.run(["perf", "record", "-F", "999", "-p", ",".join(targets), "-o", data, "--",
                        "sleep", str(seconds)], capture_output=True, check=True)
    else:
        time.sleep(seconds)
    (u1, s1), (v1, i1), (idle1, all1) = user_system(pid), switches(pid), machine_ticks()
    client1 = sum(user_system(wrk.pid))
    elapsed = time.monotonic() - served0
    out, _ = wrk.communicate()
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    conns = rate * elapsed
    row = {"name": name, "rate": rate, "cpu": (u1 - u0 + s1 - s0) / conns, "system": (s1 - s0) / conns,
           "voluntary": (v1 - v0) / conns, "involuntary": (i1 - i0) / conns,
           "idle": 100.0 * (idle1 - idle0) / max(1, all1 - all0),
           "client": (client1 - client0) / conns, "client_core": (client1 - client0) / elapsed / 1e4}
    if perf:
        row["perf_us"], row["symbols"] = symbols(data, conns)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--no-perf", action="store_true")
    a = parser.parse_args()
    env = b.Env(tempfile.mkdtemp(prefix="sap-handshakes-"))
    try:
        b.start_upstream(env, 1)
        emulator = b.start_emulator(env, "emu", 86_400)
        env.token = b.fetch_static_token(emulator)
        tls = setups.make_certs(env)
        upstream = setups.plain_upstream(env)
        contenders = scenarios.tls_front(env, emulator, tls, upstream)
        scenarios.tls_sessions(contenders)
        front = {role: (p, port, path) for _, p, port, _, role, path in contenders}
        server_tls = f'tls_cert = "{tls["cert"]}"\ntls_key = "{tls["key"]}"'
        os.environ["SITECORE_PROXY_WORKERS"] = "1"
        one, one_port = setups.start_proxy(env, "proxy-one-worker", emulator, lambda pt: setups.proxy_text(
            pt, emulator, [("/deploy", f"http://127.0.0.1:{upstream.port}/base")], server_tls))
        del os.environ["SITECORE_PROXY_WORKERS"]
        front["proxy, one worker"] = (one, one_port, b.CLIENT_PATH)
        rows = []
        for role in ("nginx", "proxy", "proxy, one worker", "floor"):
            p, port, path = front[role]
            url = f"https://127.0.0.1:{port}{path}"
            rows.append(measure(role, p.pid, url, a.seconds, not a.no_perf, env.workdir))
        print("| contender | connections/s | CPU µs/conn | of which system | voluntary switches/conn "
              "| involuntary/conn | machine idle | wrk µs/conn | wrk, % of a core |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['rate']:,.0f} | {r['cpu']:.1f} | {r['system']:.1f} | "
                  f"{r['voluntary']:.2f} | {r['involuntary']:.2f} | {r['idle']:.0f} % | {r['client']:.1f} | "
                  f"{r['client_core']:.0f} % |")
        if a.no_perf:
            return
        print("\nperf, µs per connection (symbols from at least "
              f"{MIN_SYMBOL_US} µs in one contender; the total is perf's cpu-clock count):\n")
        keep = {(kind, sym) for r in rows for us, kind, sym in r["symbols"] if us >= MIN_SYMBOL_US}
        cost = [{(kind, sym): us for us, kind, sym in r["symbols"]} for r in rows]
        order = sorted(keep, key=lambda k: -max(c.get(k, 0) for c in cost))
        print("| symbol | " + " | ".join(r["name"] for r in rows) + " |")
        print("|---|" + "---|" * len(rows))
        print("| **total** | " + " | ".join(f"**{r['perf_us']:.1f}**" for r in rows) + " |")
        places = sorted({kind for c in cost for kind, _ in c}, key=lambda w: -max(
            sum(us for (kind, _), us in c.items() if kind == w) for c in cost))
        for place in places:
            total = [sum(us for (kind, _), us in c.items() if kind == place) for c in cost]
            if max(total) >= MIN_SYMBOL_US:
                print(f"| **{place}, all** | " + " | ".join(f"**{t:.1f}**" for t in total) + " |")
        for k in order:
            print(f"| `{k[1][:60]}` ({k[0]}) | " + " | ".join(f"{c.get(k, 0):.1f}" for c in cost) + " |")
    finally:
        b.stop_all()


if __name__ == "__main__":
    main()
