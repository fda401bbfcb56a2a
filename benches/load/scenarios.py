"""The load comparison as users run it: scenarios beyond the default run, chosen with
`bench.py --scenarios LIST` (also through run.sh). Each one starts its own contenders, loads
them in interleaved repetitions like the default run, prints a table per load with the goals'
ratios from the same run, and stops them again.

  tls-upstream   HTTPS upstream (certificate made for the run), plain HTTP clients (h1, h2c):
                 nginx (proxy_ssl_session_reuse, upstream keepalive), HAProxy (ssl verify
                 required, http-reuse always), the proxy (upstream_ca) to an upstream that speaks
                 HTTP/1.1 only and to one that offers h2 by ALPN, the floor (--upstream-tls).
                 The upstream counts the connections and full and resumed TLS handshakes each
                 contender made during its runs: a pool that keeps its connections makes a few.
                 Every contender must reach it on TLS 1.3 (checked after the warm-up).
  tls-client     TLS from the clients (wrk https: HTTP/1.1; h2load https: h2 by ALPN), plain
                 upstream, keep-alive on both sides.
  tls-handshake  TLS from the clients, one request per connection: `resume` (wrk with
                 `Connection: close`: a new TCP connection and a resumed TLS 1.3 handshake per
                 request, wrk keeps the session), `resume-c400` (the same with 400 clients, more
                 than rustls's default server session cache of 256 holds) and `full` (batches of
                 `h2load --h1 -n64 -c64`: 64 connections at once, each a full handshake and one
                 request). Before the runs, Python's ssl module checks that each contender
                 speaks TLS 1.3 and resumes sessions. Both scenarios that take TLS from clients
                 stop if one answers a TLS 1.3 client with TLS 1.2 (nginx before 1.23.4 does
                 unless told: its TLS 1.2 resumption has no key exchange).
  many           1,000 [[clients]] (key_sha256) and 200 routes, requests spread over both (wrk
                 with spread.lua: a random route and a random client key per request; h2load
                 cycles through the 200 routes with one key). nginx: 200 `location` blocks and a
                 `map` of the 1,000 keys; HAProxy: a `map` of the keys and a `map_beg` of the
                 route prefixes. Neither can check a key hash, so a lookup of the key itself is
                 their equivalent.
  growth         the proxy alone with 10 clients and 10 routes, 1,000 clients and 10 routes, and
                 10 clients and 1,000 routes (spread.lua, h1): how its CPU per request grows
                 with the number of clients and of routes (goal: flat), and the floor.
  tracing        the proxy without [telemetry], with sample_ratio 0.01 and with 1.0, exporting
                 to examples/bench_otlp_sink.rs; after each run the spans the sink received and
                 the proxy's telemetry_spans_dropped_total and telemetry_export_failures_total.
                 `--proxy-before BIN` adds a build from before [telemetry] existed (b8af883).
  fleet          one replica with [cluster] (a redis-server of the run's own, share_tokens,
                 the default sync_interval of 100 ms) against the same proxy without it, both
                 with a route `rate` that never refuses, so the fleet's rate sync has a limiter
                 to reconcile: throughput and CPU per request (goal: within 3 %), and the Redis
                 commands per second the replica sends at full load (h1, 64 connections) and at
                 one request at a time (h1-c1): the same figure at both, set by sync_interval
                 and not by the request rate, is the goal.

Goals, as ratios of the same run: the proxy's req/s at least nginx's, its p99 at most nginx's, its
CPU per request within 10 % of the floor's.
"""

import json
import os
import re
import ssl
import subprocess
import time
import urllib.request

import bench as b
from setups import (DEPLOY_REWRITE, Redis, get_json, make_certs, nginx_proxy_settings,
                    nginx_upstream_block, plain_upstream, proxy_text, start_haproxy, start_nginx, tls_session,
                    start_proxy, start_upstream)

ALL = ("tls-upstream", "tls-client", "tls-handshake", "many", "growth", "tracing", "fleet")
SPREAD_LUA = os.path.join(b.HERE, "spread.lua")
# Connections opened at once per `h2load` batch of the `full` handshake load.
HANDSHAKE_BATCH = 64
# Connections of the `resume` load (wrk, `Connection: close`), and of `resume-c400`: more
# clients reconnecting than rustls's default server session cache holds (256 sessions).
RESUME_CONNS = 16
RESUME_MANY = 400
# How long the tracing rows wait after a run before reading the sink: the proxy's batch
# processor sends what it holds at least every 2 s.
TRACE_SETTLE_S = 3.0


class Contender:
    """One row: its process (whose tree's CPU is measured), what each load targets, the
    upstream (setups.Upstream) it uses, and `observe`, counters read before and after each
    run."""

    def __init__(self, name, process, targets, upstream, role, observe=None):
        self.name = name
        self.process = process
        self.targets = targets
        self.upstream = upstream
        self.role = role
        self.observe = observe


def metric(admin_port, name):
    """The sum of a Prometheus metric's samples on the proxy's admin listener."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------- loads


def wrk_load(conns, duration, args=()):
    return lambda url: b.run_wrk(url, conns, duration, args)


def h2load_load(conns, streams, duration, workdir, args=()):
    return lambda url: b.run_h2load(url, conns, streams, duration, workdir, args)


def run_full_handshakes(url, duration):
    """New connections, each a full TLS handshake and one HTTP/1.1 request: `h2load --h1
    -n64 -c64` (64 connections at once, each its own session) in a loop for `duration` s.
    req/s is connections over the time h2load was running (not the gaps between batches), the
    latency is h2load's mean and maximum time to the first byte (connect and handshake
    included), p50 and p99 are not measured."""
    deadline = time.monotonic() + duration
    done = errors = 0
    busy_s = 0.0
    ttfb_mean, ttfb_max = [], []
    while time.monotonic() < deadline:
        out = subprocess.run(["h2load", "--h1", "-t1", f"-n{HANDSHAKE_BATCH}", f"-c{HANDSHAKE_BATCH}", url],
                             capture_output=True, text=True, timeout=120).stdout
        m = re.search(r"finished in ([\d.]+)(us|ms|s),", out)
        busy_s += b.to_us(m.group(1), m.group(2)) / 1e6
        r = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
        done += int(r.group(2))
        errors += int(r.group(3)) + int(r.group(4))
        t = re.search(r"time to 1st byte:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
        if t:
            ttfb_max.append(b.to_us(t.group(3), t.group(4)))
            ttfb_mean.append(b.to_us(t.group(5), t.group(6)))
    return {
        "rps": round(done / busy_s, 1) if busy_s else 0.0,
        "requests": done,
        "errors": errors,
        "ttfb_mean_us": round(sum(ttfb_mean) / len(ttfb_mean), 1) if ttfb_mean else None,
        "ttfb_max_us": max(ttfb_max) if ttfb_max else None,
    }


# ---------------------------------------------------------------- running and reporting


def interleave(title, contenders, loads, reps, settle=0.0):
    """Every load on every contender that has a target for it, `reps` times, interleaved."""
    samples = {load: {c.name: [] for c in contenders if load in c.targets} for load in loads}
    for rep in range(reps):
        for load, run in loads.items():
            for c in contenders:
                if load not in c.targets:
                    continue
                b.log(f"{title}: rep {rep + 1}/{reps} {load} {c.name}")
                pids = {"upstream": c.upstream.process.pid}
                if c.role != "direct":
                    pids["contender"] = c.process.pid
                before = c.observe() if c.observe else None
                target = c.targets[load]
                r = b.measured(lambda: run(target), pids, served=c.upstream.served)
                if c.observe:
                    time.sleep(settle)
                    after = c.observe()
                    for k, v in after.items():
                        r[k] = v - before[k]
                samples[load][c.name].append(r)
    return {load: {n: b.summarize(s) for n, s in by.items() if s} for load, by in samples.items()}


def med(r, key):
    v = r.get(key)
    return v.get("median") if isinstance(v, dict) else v


def goals(results, contenders):
    """The goals' ratios for each proxy row, per load: req/s and p99 against nginx, CPU per
    request against the floor."""
    roles = {c.name: c.role for c in contenders}
    out = {}
    for load, rows in results.items():
        nginx = next((r for n, r in rows.items() if roles.get(n) == "nginx"), None)
        floor = next((r for n, r in rows.items() if roles.get(n) == "floor"), None)
        for name, r in rows.items():
            if roles.get(name) != "proxy":
                continue
            g = {}
            if nginx:
                g["rps_vs_nginx"] = b.ratio(med(r, "rps"), med(nginx, "rps"))
                g["p99_vs_nginx"] = b.ratio(med(r, "p99_us"), med(nginx, "p99_us"))
            if floor:
                g["cpu_vs_floor"] = b.ratio(med(r, "contender_cpu_us_per_req"), med(floor, "contender_cpu_us_per_req"))
            out.setdefault(load, {})[name] = g
    return out


def table(title, load, rows, contenders, extra=()):
    """One load's rows; `extra` are (column title, result key, digits) of observed counters."""
    roles = {c.name: c.role for c in contenders}
    nginx = next((r for n, r in rows.items() if roles.get(n) == "nginx"), None)
    floor = next((r for n, r in rows.items() if roles.get(n) == "floor"), None)
    head = (f"| {title} {load} | req/s median (min-max) | p50 us | p99 us | CPU us/req | CPU us/req (upstream) | "
            f"errors | req/s vs nginx | p99 vs nginx | CPU vs floor | "
            + "".join(f"{t} | " for t, _, _ in extra) + "other processes' CPU % |")
    lines = [head, "|" + "---|" * (11 + len(extra))]
    for name, r in rows.items():
        cpu = med(r, "contender_cpu_us_per_req") if roles.get(name) != "direct" else None
        cells = [
            name,
            f"{b.fmt_num(med(r, 'rps'))} ({b.fmt_num(r['rps']['min'])}-{b.fmt_num(r['rps']['max'])})",
            b.fmt_num(med(r, "p50_us")), b.fmt_num(med(r, "p99_us")),
            b.fmt_num(cpu, 2), b.fmt_num(med(r, "upstream_cpu_us_per_req"), 2), str(r["errors"]),
            b.fmt_num(b.ratio(med(r, "rps"), med(nginx, "rps")) if nginx else None, 2),
            b.fmt_num(b.ratio(med(r, "p99_us"), med(nginx, "p99_us")) if nginx else None, 2),
            b.fmt_num(b.ratio(cpu, med(floor, "contender_cpu_us_per_req")) if floor and cpu else None, 2),
        ]
        cells += [b.fmt_num(med(r, key), digits) for _, key, digits in extra]
        cells.append(b.fmt_num(med(r, "foreign_cpu_pct"), 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(title, results, contenders, extra=(), notes=None):
    text = [table(title, load, rows, contenders, extra) for load, rows in results.items()]
    return {"results": results, "goals": goals(results, contenders), "notes": notes or {},
            "tables": text}


def stop(contenders, keep=()):
    for c in contenders:
        if c.process not in keep and c.role != "direct":
            b.stop(c.process)


# ---------------------------------------------------------------- scenarios


def tls_upstream(env, emulator, tls, a, reps, duration):
    up_h1 = start_upstream(env, "tls-up-h1", tls, alpn="http/1.1")
    up_h2 = start_upstream(env, "tls-up-h2", tls, alpn="h2,http/1.1")
    port, port2 = b.free_port(), b.free_port()
    body = nginx_upstream_block("tls_up", up_h1.port) + f"""    server {{
        listen 127.0.0.1:{port} reuseport;
        listen 127.0.0.1:{port2} http2;
{nginx_proxy_settings(env, up_h1.port, tls)}        location /deploy/ {{
            proxy_pass https://tls_up/base/;
        }}
    }}"""
    nginx = start_nginx(env, "nginx-tls-up", body, (port, port2))
    hp, hp2 = b.free_port(), b.free_port()
    haproxy = start_haproxy(env, "haproxy-tls-up", [(f"127.0.0.1:{hp}", hp), (f"127.0.0.1:{hp2} proto h2", hp2)],
                            DEPLOY_REWRITE, up_h1.port, tls_upstream=tls)
    ca = f'upstream_ca = ["{tls["ca"]}"]'
    p1, pp1 = start_proxy(env, "proxy-tls-up-h1", emulator, lambda pt: proxy_text(
        pt, emulator, [("/deploy", f"https://127.0.0.1:{up_h1.port}/base")], ca))
    p2, pp2 = start_proxy(env, "proxy-tls-up-h2", emulator, lambda pt: proxy_text(
        pt, emulator, [("/deploy", f"https://127.0.0.1:{up_h2.port}/base")], ca))
    floor, fp, fp2 = b.start_floor(env, name="floor-tls-up", upstream_port=up_h1.port,
                                   args=["--upstream-tls", tls["ca"], "localhost"])
    path = b.CLIENT_PATH

    def both(p, p2=None):
        return {"h1": f"http://127.0.0.1:{p}{path}", "h2": f"http://127.0.0.1:{p2 or p}{path}"}

    contenders = [
        Contender("nginx", nginx, both(port, port2), up_h1, "nginx", up_h1.observe),
        Contender("haproxy", haproxy, both(hp, hp2), up_h1, "haproxy", up_h1.observe),
        Contender("sitecore-auth-proxy (upstream HTTP/1.1)", p1, both(pp1), up_h1, "proxy", up_h1.observe),
        Contender("sitecore-auth-proxy (upstream offers h2)", p2, both(pp2), up_h2, "proxy-h2", up_h2.observe),
        Contender("hyper floor (upstream HTTP/1.1)", floor, both(fp, fp2), up_h1, "floor", up_h1.observe),
    ]
    warm_up(contenders)
    require_tls13_upstream(contenders)
    loads = {"h1": wrk_load(a.conns, duration),
             "h2": h2load_load(a.h2_conns, a.h2_streams, duration, env.workdir)}
    results = interleave("tls-upstream", contenders, loads, reps)
    stop(contenders)
    for u in (up_h1, up_h2):
        b.stop(u.process)
    return report("tls-upstream", results, contenders, extra=(
        ("upstream conns per run", "upstream_connections", 0), ("full TLS handshakes", "upstream_tls_full", 0),
        ("resumed", "upstream_tls_resumed", 0)), notes={
        "upstream": "examples/bench_upstream.rs --tls, HTTP/1.1 only by ALPN (nginx, HAProxy, the floor and the "
                    "first proxy row) or h2 and HTTP/1.1 (the second proxy row)",
        "clients": "plain HTTP: wrk (HTTP/1.1 keep-alive), h2load (h2c prior knowledge)"})


def tls_front(env, emulator, tls, upstream):
    """Contenders that take TLS from clients (h1 and h2 by ALPN on one port) in front of the
    plain upstream."""
    port = b.free_port()
    body = nginx_upstream_block("fast", upstream.port) + f"""    server {{
        listen 127.0.0.1:{port} ssl http2 reuseport;
        ssl_certificate {tls['cert']};
        ssl_certificate_key {tls['key']};
        ssl_session_cache shared:SSL:10m;
        # nginx before 1.23.4 (Debian 12 has 1.22) speaks TLS 1.2 at most unless told.
        ssl_protocols TLSv1.2 TLSv1.3;
{nginx_proxy_settings(env, upstream.port)}        location /deploy/ {{
            proxy_pass http://fast/base/;
        }}
    }}"""
    nginx = start_nginx(env, "nginx-tls-client", body, (port,))
    hp = b.free_port()
    haproxy = start_haproxy(env, "haproxy-tls-client",
                            [(f"127.0.0.1:{hp} ssl crt {tls['combined']} alpn h2,http/1.1", hp)],
                            DEPLOY_REWRITE, upstream.port)
    server_tls = f'tls_cert = "{tls["cert"]}"\ntls_key = "{tls["key"]}"'
    proxy, pp = start_proxy(env, "proxy-tls-client", emulator, lambda pt: proxy_text(
        pt, emulator, [("/deploy", f"http://127.0.0.1:{upstream.port}/base")], server_tls))
    floor, fp, _ = b.start_floor(env, name="floor-tls-client", upstream_port=upstream.port,
                                 args=["--tls", tls["cert"], tls["key"]])
    direct = start_upstream(env, "tls-direct", tls)
    return [
        ("direct", direct.process, direct.port, direct, "direct", b.UPSTREAM_PATH),
        ("nginx", nginx, port, upstream, "nginx", b.CLIENT_PATH),
        ("haproxy", haproxy, hp, upstream, "haproxy", b.CLIENT_PATH),
        ("sitecore-auth-proxy", proxy, pp, upstream, "proxy", b.CLIENT_PATH),
        ("hyper floor (no proxy logic)", floor, fp, upstream, "floor", b.CLIENT_PATH),
    ]


def tls_sessions(front):
    """Each TLS-terminating contender's version and resumption (setups.tls_session). Every one must
    speak TLS 1.3 to a TLS 1.3 client (a TLS 1.2 resumption skips the key exchange, and the
    comparison would no longer be like for like) and resume its sessions."""
    sessions = {n: tls_session(port) for n, _, port, _, _, _ in front}
    off = {n: s for n, s in sessions.items() if s["version"] != "TLSv1.3" or not s["resumed"]}
    if off:
        raise SystemExit(f"not a resumed TLS 1.3 session with a TLS 1.3 client: {off}; "
                         "check their configuration")
    return sessions


def require_tls13_upstream(contenders):
    """After the warm-up: no contender reached the HTTPS upstream on TLS 1.2 (see tls_sessions)."""
    off = [c.name for c in contenders if c.observe and c.observe().get("upstream_tls12")]
    if off:
        raise SystemExit(f"TLS 1.2 to the upstream (bench_upstream counted it) from one of: {off}")


def tls_client(env, emulator, tls, a, reps, duration):
    front = tls_front(env, emulator, tls, plain_upstream(env))
    tls_sessions(front)
    contenders = [Contender(n, p, {"h1": f"https://127.0.0.1:{port}{path}", "h2": f"https://127.0.0.1:{port}{path}"},
                            up, role) for n, p, port, up, role, path in front]
    warm_up(contenders)
    loads = {"h1": wrk_load(a.conns, duration),
             "h2": h2load_load(a.h2_conns, a.h2_streams, duration, env.workdir)}
    results = interleave("tls-client", contenders, loads, reps)
    stop(contenders)
    b.stop(front[0][1])
    return report("tls-client", results, contenders, notes={
        "clients": f"wrk https (HTTP/1.1, -c{a.conns}), h2load https (h2 by ALPN, -c{a.h2_conns} -m{a.h2_streams})"})


def tls_handshake(env, emulator, tls, a, reps, duration):
    front = tls_front(env, emulator, tls, plain_upstream(env))
    contenders = [Contender(n, p, {load: f"https://127.0.0.1:{port}{path}" for load in ("resume", "resume-c400", "full")},
                            up, role) for n, p, port, up, role, path in front]
    resumption = tls_sessions(front)
    warm_up(contenders)
    loads = {"resume": wrk_load(RESUME_CONNS, duration, ["-H", "Connection: close"]),
             "resume-c400": wrk_load(RESUME_MANY, duration, ["-H", "Connection: close"]),
             "full": lambda url: run_full_handshakes(url, duration)}
    results = interleave("tls-handshake", contenders, loads, reps)
    stop(contenders)
    b.stop(front[0][1])
    out = report("tls-handshake", results, contenders, extra=(("ttfb mean us", "ttfb_mean_us", 0),
                                                             ("ttfb max us", "ttfb_max_us", 0)),
                 notes={"resume": f"wrk -t1 -c{RESUME_CONNS} -H 'Connection: close': each request on a new "
                                  "connection; wrk keeps the TLS session, so each handshake is a resumed TLS 1.3 one "
                                  "(PSK with ECDHE)",
                        "resume-c400": f"the same with -c{RESUME_MANY}: more clients reconnecting than rustls's "
                                       "default server session cache (256) holds",
                        "full": f"h2load --h1 -n{HANDSHAKE_BATCH} -c{HANDSHAKE_BATCH} in a loop: each connection a "
                                "full handshake (ECDSA P-256 certificate) and one request; req/s counts the time "
                                "h2load ran, not the gaps between batches; no p50/p99, the mean and max time to "
                                "the first byte (connect and handshake included) instead",
                        "resumption_works": resumption})
    return out


def write_uris(env, name, port, routes):
    path = env.path(f"{name}.uris")
    with open(path, "w") as f:
        for i in range(routes):
            f.write(f"http://127.0.0.1:{port}/r{i}/api/projects/v1\n")
    return path


def many(env, emulator, a, reps, duration, routes=200, clients=1000):
    up = plain_upstream(env)
    port, port2 = b.free_port(), b.free_port()
    keys = "\n".join(f'        "bench-key-{i}" c{i};' for i in range(clients))
    locations = "\n".join(f"        location /r{i}/ {{ proxy_pass http://fast/b{i}/; }}" for i in range(routes))
    body = nginx_upstream_block("fast", up.port) + f"""    map_hash_max_size 4096;
    map $http_x_api_key $bench_client {{
        default "";
{keys}
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        listen 127.0.0.1:{port2} http2;
        if ($bench_client = "") {{ return 401; }}
{nginx_proxy_settings(env, up.port)}        proxy_set_header X-Api-Key "";
{locations}
    }}"""
    nginx = start_nginx(env, "nginx-many", body, (port, port2))
    keys_map, routes_map = env.path("keys.map"), env.path("routes.map")
    with open(keys_map, "w") as f:
        f.writelines(f"bench-key-{i} c{i}\n" for i in range(clients))
    with open(routes_map, "w") as f:
        f.writelines(f"/r{i}/ /b{i}\n" for i in range(routes))
    hp, hp2 = b.free_port(), b.free_port()
    frontend = f"""    http-request deny deny_status 401 unless {{ req.hdr(x-api-key),map({keys_map}) -m found }}
    http-request del-header x-api-key
    http-request set-var(txn.base) path,map_beg({routes_map})
    http-request deny deny_status 404 unless {{ var(txn.base) -m found }}
    http-request replace-path ^/r[0-9]+(/.*)?$ %[var(txn.base)]\\1"""
    haproxy = start_haproxy(env, "haproxy-many", [(f"127.0.0.1:{hp}", hp), (f"127.0.0.1:{hp2} proto h2", hp2)],
                            frontend, up.port)
    proxy, pp = start_proxy(env, "proxy-many", emulator, lambda pt: proxy_text(
        pt, emulator, [(f"/r{i}", f"http://127.0.0.1:{up.port}/b{i}") for i in range(routes)], clients=clients))
    floor, fp, fp2 = b.start_floor(env, name="floor-many")
    key = ["-H", "x-api-key: bench-key-7"]

    def targets(p, p2=None):
        return {"h1": (f"http://127.0.0.1:{p}/", routes, clients),
                "h2": write_uris(env, f"many-{p2 or p}", p2 or p, routes)}

    contenders = [
        Contender("nginx", nginx, targets(port, port2), up, "nginx"),
        Contender("haproxy", haproxy, targets(hp, hp2), up, "haproxy"),
        Contender("sitecore-auth-proxy", proxy, targets(pp), up, "proxy"),
        Contender("hyper floor (no proxy logic)", floor, targets(fp, fp2), up, "floor"),
    ]
    warm_up(contenders, spread=True)
    loads = {"h1": lambda target: with_spread(target, a.conns, duration),
             "h2": lambda uris: b.run_h2load(None, a.h2_conns, a.h2_streams, duration, env.workdir,
                                             ["-i", uris, *key])}
    results = interleave("many", contenders, loads, reps)
    stop(contenders)
    return report("many", results, contenders, notes={
        "setup": f"{clients} [[clients]] with key_sha256, {routes} routes /r<i> -> upstream /b<i>; nginx: "
                 f"{routes} locations and a map of the {clients} keys; HAProxy: map() of the keys and "
                 "map_beg() of the prefixes; the floor only forwards (it does neither)",
        "h1": f"wrk -t1 -c{a.conns} -s spread.lua: a random route and a random client key (X-Api-Key) per request",
        "h2": f"h2load -c{a.h2_conns} -m{a.h2_streams} -i <{routes} URIs, one per route> -H 'x-api-key: "
              "bench-key-7': every route, one client key"})


def growth(env, emulator, a, reps, duration):
    up = plain_upstream(env)
    shapes = [(10, 10), (1000, 10), (10, 1000)]
    contenders = []
    for clients, routes in shapes:
        name = f"proxy-growth-{clients}c-{routes}r"
        proxy, pp = start_proxy(env, name, emulator, lambda pt, c=clients, r=routes: proxy_text(
            pt, emulator, [(f"/r{i}", f"http://127.0.0.1:{up.port}/b{i}") for i in range(r)], clients=c))
        contenders.append(Contender(f"sitecore-auth-proxy, {clients} clients, {routes} routes", proxy,
                                    {"h1": (f"http://127.0.0.1:{pp}/", routes, clients)}, up, "proxy"))
    floor, fp, _ = b.start_floor(env, name="floor-growth")
    contenders.append(Contender("hyper floor (no proxy logic)", floor, {"h1": (f"http://127.0.0.1:{fp}/", 1000, 1000)},
                                up, "floor"))
    warm_up(contenders, spread=True)
    # Each row with its own counts (spread.lua takes them from the environment).
    loads = {"h1": lambda target: with_spread(target, a.conns, duration)}
    results = interleave("growth", contenders, loads, reps)
    stop(contenders)
    out = report("growth", results, contenders, notes={
        "load": f"wrk -t1 -c{a.conns} -s spread.lua: a random route and client key per request, over each row's counts"})
    rows = results["h1"]
    base = med(rows[contenders[0].name], "contender_cpu_us_per_req")
    out["cpu_growth"] = {
        "clients_10_to_1000": b.ratio(med(rows[contenders[1].name], "contender_cpu_us_per_req"), base),
        "routes_10_to_1000": b.ratio(med(rows[contenders[2].name], "contender_cpu_us_per_req"), base),
    }
    return out


def tracing(env, emulator, a, reps, duration, before_bin=None):
    up = plain_upstream(env)
    out = env.path("sink.out")
    sink = b.spawn([b.SINK_BIN, "127.0.0.1:0"], open(out, "w"))
    sink_port = int(b.read_first_line(out).split()[1].rsplit(":", 1)[1])
    sink_counters = f"http://127.0.0.1:{sink_port}/counters"
    rows = [("sitecore-auth-proxy (no [telemetry])", None, None)]
    if before_bin:
        rows.append((f"sitecore-auth-proxy before [telemetry] ({os.path.basename(before_bin)})", None, before_bin))
    rows += [("sitecore-auth-proxy, tracing 0.01", 0.01, None), ("sitecore-auth-proxy, tracing 1.0", 1.0, None)]
    contenders = []
    for label, ratio, binary in rows:
        admin = b.free_port()
        # The build from before [telemetry] has the admin listener too; only the section differs.
        telemetry = ("" if ratio is None else
                     f'[telemetry]\notlp_endpoint = "http://127.0.0.1:{sink_port}"\nsample_ratio = {ratio}\n')
        extra = f'[admin]\nlisten = "127.0.0.1:{admin}"\n\n{telemetry}'
        name = "proxy-trace-" + ("off" if ratio is None else str(ratio)) + ("-before" if binary else "")
        proxy, pp = start_proxy(env, name, emulator, lambda pt, x=extra: proxy_text(
            pt, emulator, [("/deploy", f"http://127.0.0.1:{up.port}/base")], extra=x), binary=binary)

        def observe(admin=admin, traced=ratio is not None):
            if not traced:
                return {}
            s = get_json(sink_counters)
            return {"spans_received": s["spans"], "exports": s["exports"],
                    "spans_dropped": metric(admin, "telemetry_spans_dropped_total"),
                    "export_failures": metric(admin, "telemetry_export_failures_total")}

        contenders.append(Contender(label, proxy, {"h1": f"http://127.0.0.1:{pp}{b.CLIENT_PATH}",
                                                   "h2": f"http://127.0.0.1:{pp}{b.CLIENT_PATH}"},
                                    up, "proxy", observe))
    warm_up(contenders)
    loads = {"h1": wrk_load(a.conns, duration),
             "h2": h2load_load(a.h2_conns, a.h2_streams, duration, env.workdir)}
    results = interleave("tracing", contenders, loads, reps, settle=TRACE_SETTLE_S)
    for rows_ in results.values():
        for r in rows_.values():
            if "spans_received" in r:
                r["spans_per_request"] = round(med(r, "spans_received") / max(1, med(r, "served_requests")), 3)
    stop(contenders)
    b.stop(sink)
    base = contenders[0].name
    out = report("tracing", results, contenders, extra=(
        ("spans received per run", "spans_received", 0), ("spans per request", "spans_per_request", 3),
        ("spans dropped per run", "spans_dropped", 0), ("export failures", "export_failures", 0)), notes={
        "sink": "examples/bench_otlp_sink.rs (its CPU is not counted in the proxy's)",
        "spans": "a traced request makes 2 spans (server and upstream client); spans per request (spans "
                 "received over the requests the upstream served, h2load's warm-up included) is 2 x "
                 "sample_ratio when every sampled span is exported"})
    out["cpu_vs_no_telemetry"] = {
        load: {n: b.ratio(med(r, "contender_cpu_us_per_req"), med(rows_[base], "contender_cpu_us_per_req"))
               for n, r in rows_.items()} for load, rows_ in results.items()}
    return out


def fleet(env, emulator, a, reps, duration):
    up = plain_upstream(env)
    redis = Redis(env, "redis-fleet")
    rows = [("sitecore-auth-proxy, route rate (no [cluster])", ""),
            ("sitecore-auth-proxy, route rate, [cluster] (1 replica)",
             f'[cluster]\nredis_url = "{redis.url()}"\n')]
    contenders = []
    for label, extra in rows:
        name = "proxy-fleet-" + ("on" if extra else "off")
        proxy, pp = start_proxy(env, name, emulator, lambda pt, x=extra: proxy_text(
            pt, emulator, [("/deploy", f"http://127.0.0.1:{up.port}/base")], extra=x,
            route_extra=b.NEVER_REFUSING_LIMITS))
        observe = (lambda: {"redis_commands": redis.commands(), "observed_s": time.monotonic()}) if extra else None
        contenders.append(Contender(label, proxy, {"h1": f"http://127.0.0.1:{pp}{b.CLIENT_PATH}",
                                                   "h1-c1": f"http://127.0.0.1:{pp}{b.CLIENT_PATH}"},
                                    up, "proxy", observe))
    warm_up(contenders)
    # One request at a time: a twentieth or less of the full load's rate, so commands that
    # followed requests would show as a lower figure here.
    loads = {"h1": wrk_load(a.conns, duration), "h1-c1": wrk_load(1, duration)}
    results = interleave("fleet", contenders, loads, reps)
    for rows_ in results.values():
        for r in rows_.values():
            if "redis_commands" in r:
                r["redis_commands_per_s"] = round(med(r, "redis_commands") / med(r, "observed_s"), 1)
    stop(contenders)
    b.stop(redis.process)
    base, clustered = contenders[0].name, contenders[1].name
    out = report("fleet", results, contenders, extra=(
        ("Redis commands/s", "redis_commands_per_s", 1),), notes={
        "redis": "redis-server from Debian, no persistence, on loopback; commands per second are "
                 "INFO stats total_commands_processed over each run (the replica is its only client)",
        "limits": "the route has rate, burst and max_in_flight that never refuse (bench.py)"})
    out["cluster_vs_without"] = {
        load: {"rps": b.ratio(med(r[clustered], "rps"), med(r[base], "rps")),
               "cpu_per_request": b.ratio(med(r[clustered], "contender_cpu_us_per_req"),
                                          med(r[base], "contender_cpu_us_per_req"))}
        for load, r in results.items()}
    return out


# ---------------------------------------------------------------- helpers


class spread_env:
    """Sets spread.lua's counts (routes and keys) in the environment wrk inherits."""

    def __init__(self, routes, keys):
        self.values = {"SPREAD_ROUTES": str(routes), "SPREAD_KEYS": str(keys)}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *_):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def with_spread(target, conns, duration):
    url, routes, keys = target
    with spread_env(routes, keys):
        return b.run_wrk(url, conns, duration, ["-s", SPREAD_LUA])


def warm_up(contenders, spread=False):
    """Every contender answers 200 to its first target, then takes a 1 s load without errors."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for c in contenders:
        target = next(iter(c.targets.values()))
        if spread:
            r = with_spread(target, 8, 1)
        else:
            with urllib.request.urlopen(target, timeout=10, context=ctx) as resp:
                assert resp.status == 200, c.name
            r = b.run_wrk(target, 8, 1)
        if r["errors"]:
            raise RuntimeError(f"{c.name}: {r['errors']} errors in the warm-up: check its configuration")


def run(env, emulator, names, a, reps, duration):
    """Runs the scenarios in `names` and returns their reports by name."""
    unknown = set(names) - set(ALL)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}; known: {', '.join(ALL)}")
    tls = make_certs(env) if {"tls-upstream", "tls-client", "tls-handshake"} & set(names) else None
    out = {}
    for name in ALL:
        if name not in names:
            continue
        if name == "tls-upstream":
            out[name] = tls_upstream(env, emulator, tls, a, reps, duration)
        elif name == "tls-client":
            out[name] = tls_client(env, emulator, tls, a, reps, duration)
        elif name == "tls-handshake":
            out[name] = tls_handshake(env, emulator, tls, a, reps, duration)
        elif name == "many":
            out[name] = many(env, emulator, a, reps, duration)
        elif name == "growth":
            out[name] = growth(env, emulator, a, reps, duration)
        elif name == "tracing":
            out[name] = tracing(env, emulator, a, reps, duration, a.proxy_before)
        elif name == "fleet":
            out[name] = fleet(env, emulator, a, reps, duration)
        for t in out[name]["tables"]:
            print(t + "\n", flush=True)
        print(json.dumps({k: v for k, v in out[name].items() if k not in ("tables", "results")}, indent=2) + "\n",
              flush=True)
    return out
