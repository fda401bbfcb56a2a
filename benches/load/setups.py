"""What the scenarios of scenarios.py run: the certificate of a run, the bench upstream (plain
or HTTPS), a redis-server, and nginx, HAProxy and proxy configurations for each scenario's job. The default
run's contenders are in bench.py; these keep its settings (workers = cores, keep-alive on both
sides, an access log) and add what a scenario needs.
"""

import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import urllib.request

import bench as b


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())

# ---------------------------------------------------------------- certificates


def make_certs(env):
    """A CA and a certificate for `localhost` and 127.0.0.1 signed by it (ECDSA P-256, as
    most public CAs issue now), made with the openssl CLI for this run."""
    d = env.path("tls")
    os.makedirs(d, exist_ok=True)
    p = {k: os.path.join(d, f) for k, f in (("ca", "ca.pem"), ("ca_key", "ca.key"), ("cert", "cert.pem"),
                                            ("key", "cert.key"), ("csr", "cert.csr"), ("ext", "ext.cnf"),
                                            ("combined", "combined.pem"))}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", p["ca_key"], "-out", p["ca"], "-days", "2", "-subj", "/CN=bench-ca")
    openssl("req", *ec, "-keyout", p["key"], "-out", p["csr"], "-subj", "/CN=localhost")
    with open(p["ext"], "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", p["csr"], "-CA", p["ca"], "-CAkey", p["ca_key"], "-CAcreateserial",
            "-days", "2", "-out", p["cert"], "-extfile", p["ext"])
    with open(p["combined"], "w") as f:
        f.write(open(p["cert"]).read() + open(p["key"]).read())
    return p


def tls_session(port):
    """The TLS version a client gets from the server on `port`, and whether its second connection
    resumes the first's session (Python's ssl module, TLS 1.3 tickets read with the first
    response): `{"version": "TLSv1.3", "resumed": True}`."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    session = None
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                while s.recv(65536):
                    pass
                reused = s.session_reused
                session = s.session
                version = s.version()
    return {"version": version, "resumed": reused}


# ---------------------------------------------------------------- processes


class Upstream:
    def __init__(self, process, port, counters):
        self.process = process
        self.port = port
        self.counters = counters

    def served(self):
        """Requests it has answered since it started."""
        return get_json(self.counters)["requests"]

    def observe(self):
        c = get_json(self.counters)
        return {"upstream_connections": c["connections"], "upstream_tls_full": c["tls_full"],
                "upstream_tls_resumed": c["tls_resumed"], "upstream_tls12": c["tls12"]}


def start_upstream(env, name, tls=None, alpn="h2,http/1.1"):
    out = env.path(f"{name}.out")
    args = [b.UPSTREAM_BIN, "127.0.0.1:0", "1"]
    if tls:
        args += ["--tls", tls["cert"], tls["key"], "--alpn", alpn]
    p = b.spawn(args, open(out, "w"))
    line = b.read_first_line(out).split()
    return Upstream(p, int(line[1].rsplit(":", 1)[1]), f"http://{line[2]}/")


def plain_upstream(env):
    return Upstream(env.upstream, env.upstream_port, env.upstream_counters)


NGINX_HTTP = """worker_processes {ncpu};
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
{body}
}}
"""


def start_nginx(env, name, body, ports):
    """nginx with the default run's settings (workers = cores, keep-alive, an access log) and
    `body` inside `http`."""
    d = env.path(name)
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_HTTP.format(ncpu=b.NCPU, d=d, body=body))
    b.LOGS.append(os.path.join(d, "access.log"))
    p = b.spawn(["nginx", "-p", d, "-c", conf], open(os.path.join(d, "stdout.log"), "w"))
    for port in ports:
        b.wait_port(port)
    return p


def nginx_upstream_block(name, port):
    return f"""    upstream {name} {{
        server 127.0.0.1:{port};
        keepalive 256;
        keepalive_requests 1000000;
    }}
"""


def nginx_proxy_settings(env, upstream_port, tls=None):
    """What every location shares: HTTP/1.1 keep-alive upstream, Host, the static token, and
    for an HTTPS upstream verification and session reuse."""
    out = f"""        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host 127.0.0.1:{upstream_port};
        proxy_set_header Authorization "Bearer {env.token}";
"""
    if tls:
        out += f"""        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {tls['ca']};
        proxy_ssl_name localhost;
        proxy_ssl_server_name on;
        proxy_ssl_session_reuse on;
        # nginx before 1.23.4 (Debian 12 has 1.22) speaks TLS 1.2 at most unless told.
        proxy_ssl_protocols TLSv1.2 TLSv1.3;
"""
    return out


HAPROXY_CFG = """global
    nbthread {ncpu}
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
{binds}
{frontend}
    default_backend be

backend be
    http-request set-header Host 127.0.0.1:{upstream_port}
    http-request set-header Authorization "Bearer {token}"
    server up 127.0.0.1:{upstream_port} maxconn 1000{server_tls}
"""

DEPLOY_REWRITE = "    http-request replace-path ^/deploy(/.*)?$ /base\\1"


def start_haproxy(env, name, binds, frontend, upstream_port, tls_upstream=None):
    cfg = env.path(f"{name}.cfg")
    server_tls = ""
    if tls_upstream:
        # SSL session reuse towards servers is HAProxy's default.
        server_tls = f" ssl verify required ca-file {tls_upstream['ca']} sni str(localhost)"
    with open(cfg, "w") as f:
        f.write(HAPROXY_CFG.format(ncpu=b.NCPU, binds="\n".join(f"    bind {x}" for x, _ in binds),
                                   frontend=frontend, upstream_port=upstream_port, token=env.token,
                                   server_tls=server_tls))
    p = b.spawn(["haproxy", "-db", "-f", cfg], b.access_log(env.path(f"{name}.log")))
    for _, port in binds:
        b.wait_port(port)
    return p


class Redis:
    """A redis-server of the run's own (no persistence), and its command counter."""

    def __init__(self, env, name):
        if not shutil.which("redis-server"):
            raise SystemExit("redis-server is missing (run.sh installs it)")
        self.port = b.free_port()
        self.process = b.spawn(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                                "--save", "", "--appendonly", "no", "--dir", env.workdir],
                               open(env.path(f"{name}.log"), "w"))
        b.wait_port(self.port)
        # INFOs this object has sent, which Redis counts too.
        self.own = 0

    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def commands(self):
        """`total_commands_processed` of INFO stats, less the INFOs sent here: the difference of
        two readings is what the other clients sent in between."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.sendall(b"INFO stats\r\n")
            reply = b""
            while b"\r\n" not in reply:
                reply += conn.recv(4096)
            head, rest = reply.split(b"\r\n", 1)
            size = int(head[1:])
            while len(rest) < size:
                rest += conn.recv(65536)
        # Redis counts a command once it has run, so this reading leaves this INFO out.
        own, self.own = self.own, self.own + 1
        for line in rest.decode().splitlines():
            if line.startswith("total_commands_processed:"):
                return int(line.split(":", 1)[1]) - own
        raise RuntimeError("INFO stats without total_commands_processed")


def credential(emulator):
    return f"""[credentials.bench]
client_id = "emulator-client"
client_secret = "emulator-secret"
token_url = "{emulator['token_url']}"
issuer = "{emulator['issuer']}"
jwks_url = "{emulator['jwks_url']}"
"""


def proxy_text(port, emulator, routes, server_extra="", clients=0, extra="", route_extra=""):
    """A proxy config: `routes` is a list of (prefix, upstream URL), each with `route_extra`'s
    keys; `clients` [[clients]] with the key hashes of bench-key-0 ... (spread.lua's keys)."""
    text = f'[server]\nlisten = "127.0.0.1:{port}"\nmax_connections = 10000\n{server_extra}\n'
    text += extra + "\n" + credential(emulator)
    for prefix, upstream in routes:
        text += f'\n[[routes]]\nprefix = "{prefix}"\nupstream = "{upstream}"\ncredential = "bench"\n{route_extra}'
    for i in range(clients):
        digest = hashlib.sha256(f"bench-key-{i}".encode()).hexdigest()
        text += f'\n[[clients]]\nname = "c{i}"\nkey_sha256 = "{digest}"\n'
    return text


def start_proxy(env, name, emulator, text, binary=None):
    return b.start_proxy(env, name, emulator, config=text, binary=binary)
