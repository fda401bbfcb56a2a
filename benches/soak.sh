#!/usr/bin/env bash
# The soak: mixed load through the proxy against the in-process emulator, with token refreshes
# every ~30 s, injected upstream 401s and client aborts; prints and records requests, errors by
# kind, token requests and RSS every minute, and writes benches/soak-report.md.
#
# Usage: benches/soak.sh [SECONDS]   (default: $SOAK_SECONDS, else 600)
# SOAK_SAMPLE_SECONDS (default 60) sets the sampling interval for short trial runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_SECONDS="${1:-${SOAK_SECONDS:-600}}"
exec cargo test --release --test soak -- --ignored --nocapture
