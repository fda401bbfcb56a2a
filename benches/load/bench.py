#!/usr/bin/env python3
"""The load comparison and probes behind `benches/load/run.sh` (stdlib only).

One fast upstream (examples/bench_upstream.rs) serves every contender:
  direct     client -> upstream
  nginx      proxy_pass, keep-alive upstream pool, static Authorization, workers = cores
  haproxy    same job, nbthread = cores
  proxy      sitecore-auth-proxy, an oauth credential against the built-in emulator
  proxy-quiet  the same with RUST_LOG=warn (no access log), to show what logging costs
  proxy-limited  the same with a route rate and in-flight cap that never refuse: the limiter's cost
  hyper-floor  examples/bench_hyper_floor.rs: a bare forwarder on the proxy's stack and thread
             model (hyper server and client, a runtime per core) with none of its logic: what
             the stack alone costs for the job
Each is loaded by wrk (HTTP/1.1 keep-alive) and h2load (HTTP/2 prior knowledge, h2c), in
interleaved repetitions. Then the probes: cold start, 1 GiB upload, 10k idle connections, load
during token refreshes. Every process listens on 127.0.0.1 only and is stopped at the end.
"""

import argparse
import concurrent.futures
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

# scenarios.py imports this module as `bench`; when it runs as a script, that is this module, not
# a second copy with its own list of started processes.
sys.modules.setdefault("bench", sys.modules[__name__])

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HERE = os.path.dirname(os.path.abspath(__file__))


def use_binaries(target):
    """Runs the binaries of `target` (a cargo profile's output directory)."""
    global PROXY_BIN, UPSTREAM_BIN, EMULATOR_BIN, FLOOR_BIN, SINK_BIN
    PROXY_BIN = os.path.join(target, "sitecore-auth-proxy")
    UPSTREAM_BIN = os.path.join(target, "examples", "bench_upstream")
    EMULATOR_BIN = os.path.join(target, "examples", "bench_emulator")
    FLOOR_BIN = os.path.join(target, "examples", "bench_hyper_floor")
    SINK_BIN = os.path.join(target, "examples", "bench_otlp_sink")


use_binaries(os.path.join(ROOT, "target", "release"))
PROBE = os.path.join(HERE, "probe.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

# The request every contender serves: a route prefix that is rewritten to the upstream's base path.
CLIENT_PATH = "/deploy/api/projects/v1"
UPSTREAM_PATH = "/base/api/projects/v1"
# The token endpoint answers this late in the cold-start probe, so all 1,000 requests arrive
# while the first token is still in flight.
COLD_DELAY_MS = 3000

procs = []
# The contenders' access logs, emptied before every measured run (see `measured`).
LOGS = []


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def spawn(args, stdout, stderr=None, env=None):
    p = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr if stderr is not None else subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    procs.append(p)
    return p


def stop(p):
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if p in procs:
        procs.remove(p)


def stop_all():
    for p in list(procs):
        stop(p)


def read_first_line(path, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                line = f.readline()
            if line.endswith("\n"):
                return line.strip()
        time.sleep(0.02)
    raise RuntimeError(f"{path}: no output after {timeout}s")


# ---------------------------------------------------------------- /proc


def process_tree(pid):
    """pid and all its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def user_system_ticks(pid):
    """utime and stime of pid and its descendants (nginx's workers), in clock ticks; a process
    gone meanwhile counts nothing."""
    user = system = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def cpu_ticks(pid):
    """utime + stime of pid and its descendants, in clock ticks."""
    return sum(user_system_ticks(pid))


def thread_ticks(pid):
    """utime + stime of each thread of pid and its descendants, by (pid, tid), in clock ticks."""
    out = {}
    for p in process_tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[(p, tid)] = int(fields[11]) + int(fields[12])
            except OSError:
                pass
    return out


def thread_shares(before, after):
    """The busy threads' shares (%) of the CPU time between two `thread_ticks`, largest first:
    how evenly a contender spread the load over its workers."""
    used = {k: after[k] - before.get(k, 0) for k in after}
    total = sum(used.values())
    if total <= 0:
        return []
    return sorted((round(100.0 * v / total, 1) for v in used.values() if v * 20 >= total), reverse=True)


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


# ---------------------------------------------------------------- load generators


def to_us(value, unit):
    return float(value) * {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}[unit]


def run_wrk(url, conns, duration, args=()):
    """`args`: more wrk options (a Lua script, headers), before the URL."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", *args, url],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 60,
    ).stdout
    pct = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)", out, re.M))

    def lat(key):
        m = re.match(r"([\d.]+)(us|ms|s)$", pct[key])
        return to_us(m.group(1), m.group(2))

    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(x) for x in sock.groups()) if sock else 0
    )
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_us": lat("50"),
        "p99_us": lat("99"),
        "requests": requests,
        "errors": errors,
    }


def run_h2load(url, conns, streams, duration, workdir, args=()):
    """`args`: more h2load options (headers, `-i` with a file of URIs: then `url` is None)."""
    logfile = os.path.join(workdir, "h2load.log")
    out = subprocess.run(
        [
            "h2load",
            "-t1",
            f"-c{conns}",
            f"-m{streams}",
            f"-D{duration}",
            "--warm-up-time=1",
            f"--log-file={logfile}",
            *args,
            *([url] if url else []),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 60,
    ).stdout
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    done, failed, errored = int(m.group(3)), int(m.group(5)), int(m.group(6))
    status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    bad_status = int(status.group(3)) + int(status.group(4)) if status else 0
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    durations = []
    with open(logfile) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3:
                durations.append(int(parts[2]))
    os.remove(logfile)
    durations.sort()

    def pct(q):
        return float(durations[min(len(durations) - 1, int(q * len(durations)))]) if durations else None

    return {
        "rps": rps,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "requests": done,
        "errors": failed + errored + bad_status,
    }


def busy_ticks():
    """CPU time of the whole machine, in clock ticks (all CPUs, idle and iowait excluded)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal


def own_ticks():
    """CPU time of this script, its reaped children (wrk, h2load) and its live children."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    reaped = int(fields[13]) + int(fields[14])  # cutime + cstime
    return reaped + cpu_ticks(os.getpid())


def access_log(path):
    """Opens a contender's access log for appending and notes it for `measured`."""
    LOGS.append(path)
    return open(path, "a")


def cpu_us_per_req(ticks, requests):
    return round(ticks / CLK_TCK / max(1, requests) * 1e6, 2)


def empty_logs():
    for path in LOGS:
        if os.path.exists(path):
            os.truncate(path, 0)


def measured(run, pids, served=None):
    """Runs a load and adds the CPU time per request of the processes in `pids`, and how much
    CPU other processes of the machine used meanwhile (`foreign_cpu_pct`, of all cores).

    `served`, when given, counts the requests the upstream answered (its counters): CPU time is
    divided by how many it answered while the CPU was measured, rather than by the load
    generator's count, which leaves out h2load's warm-up second (`--warm-up-time=1`): the
    contender works through it too. wrk has no warm-up, and its count and the upstream's agree.

    Every access log starts the run empty, as after a log rotation. Appending to a file that has
    grown to gigabytes costs several times the system time per line (the page cache's writeback
    catches up), and the contenders write lines of different lengths, so without this the runs
    late in the sequence would measure the file system more than the contenders."""
    empty_logs()
    before = {name: cpu_ticks(pid) for name, pid in pids.items()}
    threads0 = thread_ticks(pids["contender"]) if "contender" in pids else None
    served0 = served() if served else None
    busy0, own0, t0 = busy_ticks(), own_ticks(), time.monotonic()
    result = run()
    busy1, own1, t1 = busy_ticks(), own_ticks(), time.monotonic()
    requests = result["requests"]
    if served:
        requests = result["served_requests"] = served() - served0
    for name, pid in pids.items():
        ticks = cpu_ticks(pid) - before[name]
        result[f"{name}_cpu_us_per_req"] = cpu_us_per_req(ticks, requests)
    if threads0 is not None:
        result["contender_thread_cpu_pct"] = thread_shares(threads0, thread_ticks(pids["contender"]))
    foreign = max(0, (busy1 - busy0) - (own1 - own0)) / CLK_TCK
    result["foreign_cpu_pct"] = round(100.0 * foreign / ((t1 - t0) * NCPU), 1)
    return result


# ---------------------------------------------------------------- contenders


class Env:
    def __init__(self, workdir):
        self.workdir = workdir
        self.upstream_port = None
        self.upstream = None
        self.upstream_counters = None
        self.token = None

    def path(self, name):
        return os.path.join(self.workdir, name)


def start_upstream(env, threads):
    out = env.path("upstream.out")
    p = spawn([UPSTREAM_BIN, "127.0.0.1:0", str(threads)], open(out, "w"))
    line = read_first_line(out).split()
    env.upstream = p
    env.upstream_port = int(line[1].rsplit(":", 1)[1])
    env.upstream_counters = f"http://{line[2]}/"
    return p


def start_emulator(env, name, lifetime_s, delay_ms=0):
    out = env.path(f"{name}.out")
    p = spawn([EMULATOR_BIN, str(lifetime_s), str(delay_ms)], open(out, "w"), open(env.path(f"{name}.err"), "w"))
    info = json.loads(read_first_line(out))
    info["process"] = p
    return info


def upstream_served(env):
    """Requests the bench upstream has answered since it started."""
    with urllib.request.urlopen(env.upstream_counters, timeout=5) as r:
        return json.loads(r.read())["requests"]


def emulator_counters(emulator):
    with urllib.request.urlopen(emulator["counters"], timeout=5) as r:
        return json.loads(r.read())


def fetch_static_token(emulator):
    """A real token from the emulator, for the static-header contenders (same header size)."""
    body = b"grant_type=client_credentials&client_id=emulator-client&client_secret=emulator-secret&audience=https%3A%2F%2Fapi.sitecorecloud.io"
    req = urllib.request.Request(
        emulator["token_url"],
        data=body,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())["access_token"]


# Limits that never refuse at these loads: what the limit phase costs when it only admits.
NEVER_REFUSING_LIMITS = """rate = "1000000/s"
burst = 1000000
max_in_flight = 100000
"""


def proxy_config(env, emulator, port, max_connections=10000, limits=False):
    return f"""[server]
listen = "127.0.0.1:{port}"
max_connections = {max_connections}

[credentials.bench]
client_id = "emulator-client"
client_secret = "emulator-secret"
token_url = "{emulator['token_url']}"
issuer = "{emulator['issuer']}"
jwks_url = "{emulator['jwks_url']}"

[[routes]]
prefix = "/deploy"
upstream = "http://127.0.0.1:{env.upstream_port}/base"
credential = "bench"
{NEVER_REFUSING_LIMITS if limits else ""}"""


def start_proxy(env, name, emulator, quiet=False, max_connections=10000, wait=True, wrap=(),
                limits=False, config=None, binary=None):
    """`wrap` runs the proxy under another program (instructions.py: valgrind); `limits` gives
    its route a rate and an in-flight cap that never refuse. `config`, when given, makes the
    config file's text from the listening port instead (scenarios.py); `binary` runs another
    build of the proxy."""
    port = free_port()
    cfg = env.path(f"{name}.toml")
    with open(cfg, "w") as f:
        f.write(config(port) if config else proxy_config(env, emulator, port, max_connections, limits))
    penv = dict(os.environ)
    penv["RUST_LOG"] = "warn" if quiet else "info"
    p = spawn([*wrap, binary or PROXY_BIN, "run", "--config", cfg],
              access_log(env.path(f"{name}.log")), env=penv)
    if wait:
        wait_port(port, timeout=60.0 if wrap else 20.0)
    return p, port


def start_floor(env, wrap=(), name="floor", upstream_port=None, args=()):
    """`args`: the floor's TLS options (`--upstream-tls`, `--tls`)."""
    out = env.path(f"{name}.out")
    upstream = f"127.0.0.1:{upstream_port or env.upstream_port}"
    p = spawn([*wrap, FLOOR_BIN, upstream, env.token, *args], open(out, "w"),
              open(env.path(f"{name}.err"), "w"))
    line = read_first_line(out, timeout=60.0 if wrap else 20.0)
    h1, h2 = (int(a.rsplit(":", 1)[1]) for a in line.split()[1:3])
    return p, h1, h2


def start_nginx(env):
    port, port2 = free_port(), free_port()
    d = env.path("nginx")
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes {NCPU};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8000; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 90s;
    upstream fast {{
        server 127.0.0.1:{env.upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        listen 127.0.0.1:{port2} http2;
        location /deploy/ {{
            proxy_pass http://fast/base/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:{env.upstream_port};
            proxy_set_header Authorization "Bearer {env.token}";
        }}
    }}
}}
""")
    LOGS.append(os.path.join(d, "access.log"))  # nginx opens it itself, for appending
    p = spawn(["nginx", "-p", d, "-c", conf], open(os.path.join(d, "stdout.log"), "w"))
    wait_port(port)
    wait_port(port2)
    return p, port, port2


def start_haproxy(env):
    port, port2 = free_port(), free_port()
    cfg = env.path("haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(f"""global
    nbthread {NCPU}
    maxconn 8000
    log stdout format raw local0

defaults
    mode http
    log global
    option httplog
    option http-keep-alive
    http-reuse always
    timeout connect 10s
    timeout client 90s
    timeout server 120s
    timeout http-keep-alive 90s

frontend fe
    bind 127.0.0.1:{port}
    bind 127.0.0.1:{port2} proto h2
    default_backend be

backend be
    http-request replace-path ^/deploy(/.*)?$ /base\\1
    http-request set-header Host 127.0.0.1:{env.upstream_port}
    http-request set-header Authorization "Bearer {env.token}"
    server fast 127.0.0.1:{env.upstream_port} maxconn 1000
""")
    p = spawn(["haproxy", "-db", "-f", cfg], access_log(env.path("haproxy.log")))
    wait_port(port)
    wait_port(port2)
    return p, port, port2


# ---------------------------------------------------------------- statistics


def summarize(samples):
    keys = [k for k in samples[0] if isinstance(samples[0][k], (int, float)) and samples[0][k] is not None]
    out = {}
    for k in keys:
        values = [s[k] for s in samples if s.get(k) is not None]
        if k in ("requests", "errors"):
            out[k] = sum(values)
        else:
            out[k] = {
                "median": round(statistics.median(values), 2),
                "min": round(min(values), 2),
                "max": round(max(values), 2),
            }
    # How each run spread the contender's CPU over its threads, run by run.
    spreads = [s["contender_thread_cpu_pct"] for s in samples if "contender_thread_cpu_pct" in s]
    if spreads:
        out["contender_thread_cpu_pct"] = spreads
    out["runs"] = len(samples)
    return out


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def fmt_num(x, digits=0):
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def table(results, proto):
    rows = results[proto]
    nginx = rows.get("nginx")
    direct = rows.get("direct")
    head = (
        f"| {proto} | req/s median (min-max) | p50 us | p99 us | CPU us/req (contender) | "
        f"CPU us/req (upstream) | errors | req/s vs nginx | req/s vs direct | p50 over direct us | "
        f"other processes' CPU % |"
    )
    lines = [head, "|" + "---|" * 11]
    for name, r in rows.items():
        rps = r["rps"]
        cpu = r.get("contender_cpu_us_per_req", {}).get("median")
        p50 = r["p50_us"]["median"]
        lines.append(
            "| {name} | {med} ({lo}-{hi}) | {p50} | {p99} | {cpu} | {ucpu} | {err} | {vn} | {vd} | {add} | {fg} |".format(
                name=name,
                med=fmt_num(rps["median"]),
                lo=fmt_num(rps["min"]),
                hi=fmt_num(rps["max"]),
                p50=fmt_num(p50, 0),
                p99=fmt_num(r["p99_us"]["median"], 0),
                cpu=fmt_num(cpu, 2) if name != "direct" else "-",
                ucpu=fmt_num(r.get("upstream_cpu_us_per_req", {}).get("median"), 2),
                err=r["errors"],
                vn=fmt_num(ratio(rps["median"], nginx["rps"]["median"]) if nginx else None, 2),
                vd=fmt_num(ratio(rps["median"], direct["rps"]["median"]) if direct else None, 2),
                add=fmt_num(p50 - direct["p50_us"]["median"], 0) if direct and name != "direct" else "-",
                fg=fmt_num(r.get("foreign_cpu_pct", {}).get("median"), 0),
            )
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- probes


def probe_cold_start(env, n):
    log(f"probe: cold start, {n} concurrent requests")
    emu = start_emulator(env, "emu-cold", 86_400, delay_ms=COLD_DELAY_MS)
    port = free_port()
    cfg = env.path("cold.toml")
    with open(cfg, "w") as f:
        f.write(proxy_config(env, emu, port))
    client = subprocess.Popen(
        [sys.executable, PROBE, "burst", "127.0.0.1", str(port), CLIENT_PATH, str(n), "30"],
        stdout=subprocess.PIPE,
        text=True,
    )
    penv = dict(os.environ, RUST_LOG="warn")
    proxy = spawn([PROXY_BIN, "run", "--config", cfg], open(env.path("cold.log"), "w"), env=penv)
    out, _ = client.communicate(timeout=120)
    burst = json.loads(out)
    counters = emulator_counters(emu)
    stop(proxy)
    stop(emu["process"])
    return {"requests": burst, "token_requests": counters["token_requests"], "jwks_requests": counters["jwks_requests"],
            "token_endpoint_delay_ms": COLD_DELAY_MS}


def probe_upload(env, emulator, size_bytes):
    log(f"probe: streamed upload of {size_bytes} bytes")
    proxy, port = start_proxy(env, "upload", emulator, quiet=True)
    for _ in range(10):
        urllib.request.urlopen(f"http://127.0.0.1:{port}{CLIENT_PATH}", timeout=10).read()
    before = status_kib(proxy.pid, "VmHWM")
    blob = env.path("upload.bin")
    with open(blob, "wb") as f:
        f.truncate(size_bytes)  # sparse: reads as zeros, takes no disk space
    t0 = time.monotonic()
    curl = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", blob,
         "-H", "content-type: application/octet-stream", "-H", "Expect:",
         f"http://127.0.0.1:{port}{CLIENT_PATH}/upload"],
        capture_output=True, text=True, timeout=600,
    )
    elapsed = time.monotonic() - t0
    result = {
        "bytes": size_bytes,
        "status": curl.stdout.strip(),
        "seconds": round(elapsed, 2),
        "MiB_per_s": round(size_bytes / 1048576 / elapsed, 1),
        "vmhwm_before_kib": before,
        "vmhwm_after_kib": status_kib(proxy.pid, "VmHWM"),
        "vmrss_after_kib": status_kib(proxy.pid, "VmRSS"),
    }
    os.remove(blob)
    stop(proxy)
    return result


def probe_idle(env, emulator, n, hold_s=8):
    log(f"probe: {n} idle keep-alive connections")
    proxy, port = start_proxy(env, "idle", emulator, quiet=True, max_connections=n + 1000)
    base_rss = status_kib(proxy.pid, "VmRSS")
    ready = env.path("idle.ready")
    client = subprocess.Popen(
        [sys.executable, PROBE, "idle", "127.0.0.1", str(port), CLIENT_PATH, str(n), str(hold_s), ready],
        stdout=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 180
    while not os.path.exists(ready) and time.monotonic() < deadline and client.poll() is None:
        time.sleep(0.1)
    time.sleep(1)
    rss = status_kib(proxy.pid, "VmRSS")
    hwm = status_kib(proxy.pid, "VmHWM")
    out, _ = client.communicate(timeout=hold_s + 120)
    summary = json.loads(out)
    stop(proxy)
    return {"client": summary, "vmrss_before_kib": base_rss, "vmrss_idle_kib": rss, "vmhwm_kib": hwm}


def probe_refresh(env, long_emulator, duration, reps, conns, control=False):
    """Two proxies, one refreshing its token every ~3.2 s and one with a day-long token, loaded
    at the same time by two wrk instances of `conns / 2` connections each. Run one after the
    other, the p99 of a 20 s run varied by ±35 % on the 2-core machine with or without refreshes.
    Run side by side, both see the same noise, and the ratio of each pair's p99s isolates what
    the refreshes cost. `p99_ratio` is the median of the per-pair ratios. `control` gives the
    second proxy a day-long token too (an A/A run): its ratios show the probe's own noise."""
    second = "long_lived_b" if control else "refreshing"
    lifetime = 86_400 if control else 4
    if control:
        log(f"probe: {duration}s of load on two proxies with long-lived tokens, side by side (control)")
    else:
        log(f"probe: {duration}s of load while tokens refresh (lifetime 4s) vs long-lived tokens, side by side")
    short = start_emulator(env, "emu-short", lifetime)
    p_short, port_short = start_proxy(env, "refresh-short", short)
    p_long, port_long = start_proxy(env, "refresh-long", long_emulator)
    time.sleep(1)
    urls = [f"http://127.0.0.1:{port}{CLIENT_PATH}" for port in (port_long, port_short)]
    pids = (p_long.pid, p_short.pid)
    runs = {"long_lived": [], second: []}
    pair_ratios = []
    before = emulator_counters(short)["token_requests"]
    for _ in range(reps):
        empty_logs()
        tokens0 = emulator_counters(short)["token_requests"]
        cpu0 = [cpu_ticks(pid) for pid in pids]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            long_r, short_r = pool.map(lambda url: run_wrk(url, max(1, conns // 2), duration), urls)
        for r, pid, c0 in zip((long_r, short_r), pids, cpu0):
            ticks = cpu_ticks(pid) - c0
            r["contender_cpu_us_per_req"] = cpu_us_per_req(ticks, r["requests"])
        short_r["token_requests_during_run"] = emulator_counters(short)["token_requests"] - tokens0
        runs["long_lived"].append(long_r)
        runs[second].append(short_r)
        pair_ratios.append(ratio(short_r["p99_us"], long_r["p99_us"]))
    total = emulator_counters(short)["token_requests"] - before
    stop(p_short)
    stop(p_long)
    stop(short["process"])
    out = {k: summarize(v) for k, v in runs.items()}
    out["connections_each"] = max(1, conns // 2)
    out["token_requests_during_refresh_runs"] = total
    out["p99_ratio_per_pair"] = pair_ratios
    out["p99_ratio"] = statistics.median(pair_ratios)
    return out


# ---------------------------------------------------------------- main


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for tool, args in [("nginx", ["nginx", "-v"]), ("haproxy", ["haproxy", "-v"]), ("wrk", ["wrk", "-v"]), ("h2load", ["h2load", "--version"])]:
        try:
            r = subprocess.run(args, capture_output=True, text=True)
            versions[tool] = (r.stdout + r.stderr).strip().splitlines()[0]
        except OSError:
            versions[tool] = None
    return {"nproc": NCPU, "cpu": model, "kernel": platform.release(), "tools": versions}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--duration", type=int)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--h2-conns", type=int, default=16)
    ap.add_argument("--h2-streams", type=int, default=16)
    ap.add_argument("--upstream-threads", type=int, default=1)
    ap.add_argument("--skip-probes", action="store_true")
    ap.add_argument("--protos", default="h1,h2,h1-c1", help="comma-separated subset of h1,h2,h1-c1")
    ap.add_argument("--probes", default="cold_start,upload_1gib,idle_10k,refresh",
                    help="comma-separated subset of the probes (also: refresh_control, an A/A run of the refresh probe)")
    ap.add_argument("--scenarios", default="default",
                    help="comma-separated: default (the comparison above and the probes) and/or "
                         "tls-upstream, tls-client, tls-handshake, many, growth, tracing, fleet (scenarios.py); "
                         "'all' for every one of them")
    ap.add_argument("--proxy-before", help="tracing scenario: also run this build of the proxy "
                                           "(one from before [telemetry])")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"))
    a = ap.parse_args()
    # A stopped run still stops what it started (the `finally` below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    reps = a.reps or (1 if a.quick else 3)
    duration = a.duration or (5 if a.quick else 10)

    names = [n for n in a.scenarios.split(",") if n]
    if "all" in names:
        import scenarios
        names = ["default", *scenarios.ALL]
    for tool in ("wrk", "h2load", "nginx", "haproxy", "curl", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (run.sh installs it)")

    workdir = tempfile.mkdtemp(prefix="sap-bench-")
    env = Env(workdir)
    log(f"work directory: {workdir}")
    try:
        start_upstream(env, a.upstream_threads)
        emulator = start_emulator(env, "emu-long", 86_400)
        env.token = fetch_static_token(emulator)
        results, probes, protos = {}, {}, ()
        if "default" in names:
            nginx, nginx_port, nginx_h2 = start_nginx(env)
            haproxy, haproxy_port, haproxy_h2 = start_haproxy(env)
            proxy, proxy_port = start_proxy(env, "proxy", emulator)
            quiet, quiet_port = start_proxy(env, "proxy-quiet", emulator, quiet=True)
            limited, limited_port = start_proxy(env, "proxy-limited", emulator, limits=True)
            floor, floor_port, floor_h2 = start_floor(env)
            contenders = {
                "direct": (env.upstream, f"http://127.0.0.1:{env.upstream_port}{UPSTREAM_PATH}",
                           f"http://127.0.0.1:{env.upstream_port}{UPSTREAM_PATH}"),
                "nginx": (nginx, f"http://127.0.0.1:{nginx_port}{CLIENT_PATH}", f"http://127.0.0.1:{nginx_h2}{CLIENT_PATH}"),
                "haproxy": (haproxy, f"http://127.0.0.1:{haproxy_port}{CLIENT_PATH}", f"http://127.0.0.1:{haproxy_h2}{CLIENT_PATH}"),
                "sitecore-auth-proxy": (proxy, f"http://127.0.0.1:{proxy_port}{CLIENT_PATH}", f"http://127.0.0.1:{proxy_port}{CLIENT_PATH}"),
                "sitecore-auth-proxy (RUST_LOG=warn)": (quiet, f"http://127.0.0.1:{quiet_port}{CLIENT_PATH}", f"http://127.0.0.1:{quiet_port}{CLIENT_PATH}"),
                "sitecore-auth-proxy (route rate + max_in_flight, never refusing)": (limited, f"http://127.0.0.1:{limited_port}{CLIENT_PATH}", f"http://127.0.0.1:{limited_port}{CLIENT_PATH}"),
                "hyper floor (no proxy logic)": (floor, f"http://127.0.0.1:{floor_port}{CLIENT_PATH}", f"http://127.0.0.1:{floor_h2}{CLIENT_PATH}"),
            }
            # Sanity and warm-up: every contender answers 200 through the same upstream.
            for name, (_, h1, _) in contenders.items():
                with urllib.request.urlopen(h1, timeout=10) as r:
                    assert r.status == 200, name
                run_wrk(h1, a.conns, 1)
            protos = tuple(p for p in ("h1", "h2", "h1-c1") if p in a.protos.split(","))
            samples = {proto: {n: [] for n in contenders} for proto in protos}
            for rep in range(reps):
                for proto in protos:
                    for name, (proc, h1, h2) in contenders.items():
                        log(f"rep {rep + 1}/{reps} {proto} {name}")
                        pids = {"upstream": env.upstream.pid}
                        if name != "direct":
                            pids["contender"] = proc.pid
                        if proto == "h1":
                            r = measured(lambda: run_wrk(h1, a.conns, duration), pids)
                        elif proto == "h1-c1":
                            # One connection, one request at a time: latency without queueing.
                            r = measured(lambda: run_wrk(h1, 1, duration), pids)
                        else:
                            r = measured(lambda: run_h2load(h2, a.h2_conns, a.h2_streams, duration, workdir), pids,
                                         served=lambda: upstream_served(env))
                        samples[proto][name].append(r)
            results = {proto: {n: summarize(s) for n, s in by.items()} for proto, by in samples.items()}
            stop(nginx)
            stop(haproxy)
            stop(quiet)
            stop(limited)
            stop(floor)
            probes = {}
            wanted = set() if a.skip_probes else set(a.probes.split(","))
            if "cold_start" in wanted:
                probes["cold_start"] = probe_cold_start(env, 1000)
            if "upload_1gib" in wanted:
                probes["upload_1gib"] = probe_upload(env, emulator, 1 << 30)
            if "idle_10k" in wanted:
                probes["idle_10k"] = probe_idle(env, emulator, 10_000)
            if "refresh" in wanted:
                probes["refresh"] = probe_refresh(env, emulator, 20, 1 if a.quick else 9, a.conns)
            if "refresh_control" in wanted:
                probes["refresh_control"] = probe_refresh(
                    env, emulator, 20, 1 if a.quick else 9, a.conns, control=True
                )
            stop(proxy)
        extra = [n for n in names if n != "default"]
        scenario_reports = {}
        if extra:
            import scenarios
            scenario_reports = scenarios.run(env, emulator, extra, a, reps, duration)
        report = {
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            "command": "bash benches/load/run.sh " + " ".join(sys.argv[1:]),
            "settings": {
                "reps": reps, "duration_s": duration, "wrk": f"-t1 -c{a.conns} --latency",
                "wrk_latency": "-t1 -c1 --latency (row h1-c1)",
                "h2load": f"-t1 -c{a.h2_conns} -m{a.h2_streams} --warm-up-time=1",
                "upstream_threads": a.upstream_threads, "request_path": CLIENT_PATH,
            },
            "results": results,
            "ratios": {
                proto: {
                    n: {
                        "rps_vs_nginx": ratio(r["rps"]["median"], results[proto]["nginx"]["rps"]["median"]),
                        "rps_vs_direct": ratio(r["rps"]["median"], results[proto]["direct"]["rps"]["median"]),
                        "p99_vs_nginx": ratio(r["p99_us"]["median"], results[proto]["nginx"]["p99_us"]["median"]),
                        "added_p50_us_over_direct": round(r["p50_us"]["median"] - results[proto]["direct"]["p50_us"]["median"], 1),
                    }
                    for n, r in results[proto].items()
                }
                for proto in results
            },
            "probes": probes,
            "scenarios": scenario_reports,
        }
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nMachine: {report['machine']['nproc']} x {report['machine']['cpu']}, kernel {report['machine']['kernel']}")
        print(f"Settings: {json.dumps(report['settings'])}\n")
        for proto in protos:
            print(table(results, proto))
            print()
        if probes:
            print("Probes:")
            print(json.dumps(probes, indent=2))
        for name, rep in scenario_reports.items():
            print(f"Scenario {name}:\n")
            for t in rep["tables"]:
                print(t + "\n")
        print(f"\nwritten to {a.out}")
    finally:
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
