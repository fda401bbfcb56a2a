#!/usr/bin/env python3
"""Where the proxy's CPU goes under load, and how it compares with nginx per request.

    bash benches/load/profile.sh [seconds]

1. user and system CPU per request (from /proc) for nginx, the proxy and the bare-hyper floor
   (examples/bench_hyper_floor.rs) under the same `wrk -t1 -c64` load, interleaved, two rounds;
2. a `perf record --call-graph dwarf` of the proxy under that load, bucketed by
   perf_breakdown.py.

profile.sh builds the binaries with line tables (in target/profile-build) and sets the paths.
"""

import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402

bench.use_binaries(os.environ.get("PROFILE_TARGET", os.path.join(bench.ROOT, "target", "release")))
TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def wrk_summary(out):
    lines = out.splitlines()
    requests = int(next(l for l in lines if "requests in" in l).split()[0])
    rps = next(l for l in lines if "Requests/sec" in l).split()[1]
    p99 = next(l for l in lines if l.strip().startswith("99%")).split()[1]
    return requests, rps, p99


def main():
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    env = bench.Env(tempfile.mkdtemp(prefix="sap-profile-"))
    try:
        bench.start_upstream(env, 1)
        emulator = bench.start_emulator(env, "emu", 86_400)
        env.token = bench.fetch_static_token(emulator)
        nginx, nginx_port, _ = bench.start_nginx(env)
        proxy, proxy_port = bench.start_proxy(env, "proxy", emulator)
        floor, floor_port, _ = bench.start_floor(env)
        contenders = [
            ("nginx", nginx, f"http://127.0.0.1:{nginx_port}{bench.CLIENT_PATH}"),
            ("sitecore-auth-proxy", proxy, f"http://127.0.0.1:{proxy_port}{bench.CLIENT_PATH}"),
            ("hyper floor", floor, f"http://127.0.0.1:{floor_port}{bench.CLIENT_PATH}"),
        ]
        print("| contender | req/s | p99 | user µs/req | system µs/req |")
        print("|---|---|---|---|---|")
        for _ in range(2):
            for name, process, url in contenders:
                bench.run_wrk(url, 64, 1)
                u0, s0 = bench.user_system_ticks(process.pid)
                out = subprocess.run(["wrk", "-t1", "-c64", f"-d{seconds}s", "--latency", url],
                                     capture_output=True, text=True, check=True).stdout
                u1, s1 = bench.user_system_ticks(process.pid)
                n, rps, p99 = wrk_summary(out)
                print(f"| {name} | {rps} | {p99} | {(u1 - u0) * TICK_US / n:.2f} | "
                      f"{(s1 - s0) * TICK_US / n:.2f} |", flush=True)

        data = os.path.join(env.workdir, "perf.data")
        bench.stop(floor)
        url = contenders[1][2]
        load = subprocess.Popen(["wrk", "-t1", "-c64", f"-d{seconds + 4}s", url],
                                stdout=subprocess.DEVNULL)
        time.sleep(2)
        subprocess.run(["perf", "record", "-F", "999", "--call-graph", "dwarf,32768",
                        "-p", str(proxy.pid), "-o", data, "--", "sleep", str(seconds)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        load.wait()
        script = subprocess.run(["perf", "script", "-i", data, "-F", "comm,tid,ip,sym"],
                                capture_output=True, text=True).stdout
        print()
        subprocess.run([sys.executable, os.path.join(HERE, "perf_breakdown.py")],
                       input=script, text=True, check=True)
    finally:
        bench.stop_all()


if __name__ == "__main__":
    main()
