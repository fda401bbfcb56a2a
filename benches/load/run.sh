#!/usr/bin/env bash
# Load comparison: direct vs nginx vs HAProxy vs sitecore-auth-proxy (and the bare-hyper floor), plus
# the token/memory probes.
#
#   bash benches/load/run.sh [--quick] [extra options of bench.py]
#
# Installs wrk, h2load (nghttp2-client), nginx and haproxy from Debian when missing (needs root or
# sudo and apt), builds the release binary and the benchmark examples, then runs bench.py, which
# prints the table and writes benches/load/results/latest.json. Everything listens on 127.0.0.1,
# every run is bounded in time, and every process it starts is stopped at the end.
# --quick: 1 repetition of 5 s per contender and protocol (default: 3 of 10 s).
# --scenarios LIST: the default comparison ("default") and/or the scenarios of scenarios.py
# (tls-upstream, tls-client, tls-handshake, many, growth, tracing, fleet; "all" for every one).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
command -v openssl >/dev/null || need+=(openssl)
command -v redis-server >/dev/null || need+=(redis-server)
if ((${#need[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "installing ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # Debian starts the packaged services; the benchmark runs its own instances.
    for svc in nginx haproxy redis-server; do
        if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
            $sudo systemctl stop "$svc" || true
        fi
    done
fi

echo "building release binary and benchmark examples" >&2
cargo build --release --quiet --bin sitecore-auth-proxy --example bench_upstream --example bench_emulator \
    --example bench_hyper_floor --example bench_otlp_sink

# 10,000 idle connections: the client and the proxy each need more than 10k descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

exec python3 benches/load/bench.py "$@"
