#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 5; see docs/fuzzing.md):
#   cargo-fuzz (libFuzzer, Rust core): rle_from_bytes, pb_from_bytes, pb_parts
#   atheris (libFuzzer, Python layer):  load_file, pb_parts_py (pb_parts' inputs through Python)
# Each starts from the golden files (fuzz/seed_corpus.py) and the committed regression
# inputs (fuzz/regressions/<target>/, every one replayed first), then mutates. New
# coverage accumulates in fuzz/corpus/<target>/ (not committed); a failing input is
# written to fuzz/artifacts/<target>/ and the script exits non-zero.
#
#   fuzz/run.sh                 # CI: 5 s per target, stable toolchain, no sanitizer
#   FUZZ_TOOLCHAIN=nightly FUZZ_SANITIZER=address fuzz/run.sh 1800   # a long run
#
# Needs cargo-fuzz (installed here if missing) and a Python venv with pbcodec installed
# (PYTHON, default .venv/bin/python; atheris is installed into it if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-5}
san=${FUZZ_SANITIZER:-none}
tc=()
[ -n "${FUZZ_TOOLCHAIN:-}" ] && tc=("+${FUZZ_TOOLCHAIN}")
py=${PYTHON:-.venv/bin/python}
CARGO_FUZZ_VERSION=0.13.2
ATHERIS_SPEC="atheris>=2.3" # keep in step with the `fuzz` extra in pyproject.toml
targets=(rle_from_bytes pb_from_bytes pb_parts)

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi
"$py" -c "import atheris" 2>/dev/null || "$py" -m pip install -q "$ATHERIS_SPEC"

"$py" fuzz/seed_corpus.py
# -a: debug assertions and overflow checks (an integer overflow panics, never wraps).
cargo "${tc[@]}" fuzz build -s "$san" -a

logs=$(mktemp -d)
passed=0
failed=0
run_one() { # name, command...
    local name=$1
    shift
    mkdir -p "fuzz/corpus/$name" "fuzz/regressions/$name" "fuzz/artifacts/$name"
    if "$@" >"$logs/$name.log" 2>&1; then
        passed=$((passed + 1))
        echo "fuzz $name: $(grep -E '^Done [0-9]+ runs' "$logs/$name.log" || echo done)"
    else
        failed=$((failed + 1))
        echo "fuzz $name: FAILED (input saved under fuzz/artifacts/$name/); end of its log:"
        tail -n 60 "$logs/$name.log"
    fi
}
flags=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=0)
for t in "${targets[@]}"; do
    run_one "$t" cargo "${tc[@]}" fuzz run -s "$san" -a "$t" "fuzz/corpus/$t" "fuzz/regressions/$t" -- "${flags[@]}"
done
run_one load_file "$py" fuzz/fuzz_load_file.py fuzz/corpus/load_file fuzz/regressions/load_file \
    -artifact_prefix=fuzz/artifacts/load_file/ "${flags[@]}"
# Shares pb_parts' input format: its corpus (read-only here) seeds this one.
run_one pb_parts_py "$py" fuzz/fuzz_pb_parts.py fuzz/corpus/pb_parts_py fuzz/corpus/pb_parts \
    fuzz/regressions/pb_parts_py fuzz/regressions/pb_parts -artifact_prefix=fuzz/artifacts/pb_parts_py/ "${flags[@]}"
rm -rf "$logs"
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
