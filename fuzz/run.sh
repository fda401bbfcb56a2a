#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) from its checked-in seed corpus.
#
#   bash fuzz/run.sh [SECONDS]
#
# Needs the nightly toolchain; installs cargo-fuzz when missing. Exits non-zero when any target
# finds a crash (the input is saved under fuzz/artifacts/<target>/) or fails to build. New corpus
# entries land in fuzz/corpus/<target>/ under hash names, which fuzz/.gitignore keeps untracked.
# Inputs that once crashed a target live in fuzz/regressions/<target>/ and are replayed first;
# replay one alone with `cargo +nightly fuzz run <target> fuzz/regressions/<target>/<file>`.
set -uo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "usage: $0 [SECONDS]" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2

targets=(config_parse path_rewrite token_response token_request location_rewrite)
# The same flags for build and run, so `run` reuses the build. Debug assertions catch integer
# overflow, which a release build would wrap silently.
flags=(--debug-assertions)

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked || exit 2
fi

cargo +nightly fuzz build "${flags[@]}" || exit 2

logs="fuzz/target/run-logs"
mkdir -p "$logs"
failed=()
for target in "${targets[@]}"; do
    corpus="fuzz/corpus/$target"
    mkdir -p "$corpus"
    regressions="fuzz/regressions/$target"
    if [ -d "$regressions" ]; then
        echo "== $target: replaying $regressions" >&2
        if ! cargo +nightly fuzz run "${flags[@]}" "$target" "$regressions" -- -runs=0 \
            >"$logs/$target.regressions.log" 2>&1; then
            echo "   FAILED: a saved regression still crashes; see $logs/$target.regressions.log" >&2
            grep -E -A1 'panicked at' "$logs/$target.regressions.log" | head -4 >&2
            failed+=("$target")
            continue
        fi
    fi
    echo "== $target: ${seconds}s" >&2
    # -timeout: an input slower than this is a finding too (quadratic parsing, hangs).
    cargo +nightly fuzz run "${flags[@]}" "$target" "$corpus" -- \
        -max_total_time="$seconds" -timeout=20 -print_final_stats=1 \
        >"$logs/$target.log" 2>&1
    status=$?
    runs="$(grep -oE 'Done [0-9]+ runs' "$logs/$target.log" | tail -1 | grep -oE '[0-9]+')"
    # libFuzzer's final line: `#RUNS DONE cov: C ft: F corp: ENTRIES/SIZE ...`.
    final="$(grep -E '#[0-9]+[[:space:]]+DONE' "$logs/$target.log" | tail -1)"
    cov="$(grep -oE 'cov: [0-9]+' <<<"$final" | grep -oE '[0-9]+')"
    corp="$(grep -oE 'corp: [0-9]+/[0-9]+[a-zA-Z]*' <<<"$final" | cut -d' ' -f2)"
    files="$(find "$corpus" -type f | wc -l)"
    if [ "$status" -eq 0 ]; then
        echo "   ok: ${runs:-?} execs, coverage ${cov:-?} edges, corpus ${corp:-?} (entries/bytes), $files files in $corpus" >&2
    else
        echo "   FAILED (exit $status): see $logs/$target.log and fuzz/artifacts/$target/" >&2
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$logs/$target.log" \
            | head -5 >&2
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "findings in: ${failed[*]}" >&2
    exit 1
fi
echo "all ${#targets[@]} targets ran ${seconds}s without a finding" >&2
