#!/usr/bin/env bash
# Where the proxy's CPU goes: user/system CPU per request against nginx, then a perf profile.
#
#   bash benches/load/profile.sh [seconds]
#   bash benches/load/profile.sh --instructions [requests]   # callgrind counts, see instructions.py
#
# Needs what run.sh installs (wrk, nginx, h2load) plus perf (Debian's linux-perf) and valgrind,
# installed when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

missing=()
command -v perf >/dev/null || missing+=(linux-perf)
command -v valgrind >/dev/null || missing+=(valgrind)
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for tool in wrk nginx h2load; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: run benches/load/run.sh once" >&2; exit 1; }
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/profile-build}"
CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
    cargo build --release --quiet --bin sitecore-auth-proxy --example bench_upstream --example bench_emulator \
    --example bench_hyper_floor --example bench_otlp_sink
ulimit -n 65536 2>/dev/null || true
export PROFILE_TARGET="$CARGO_TARGET_DIR/release"
if [[ ${1:-} == --instructions ]]; then
    shift
    exec python3 benches/load/instructions.py "$@"
fi
exec python3 benches/load/profile.py "$@"
