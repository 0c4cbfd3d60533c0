#!/usr/bin/env bash
# Coverage-guided fuzzing of relora's parsers with cargo-fuzz (libFuzzer + AddressSanitizer).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Builds the targets in fuzz/ and runs each for SECONDS_PER_TARGET (default 30) from its
# committed seeds (fuzz/seeds/<target>, copied into the working corpus fuzz/corpus/<target>,
# which keeps what the fuzzer finds between runs). Targets: manifest safetensors config tokens
# ffi_set (default: all). Prints executions, time and outcome per target; exits non-zero when any
# target found a crash (panic or sanitizer report), a timeout, an out-of-memory or a leak. Inputs
# that fail are saved under fuzz/artifacts/<target>/ and the logs under fuzz/artifacts/logs/.
#
# Reproduce a failure:  RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
#
# Works on a fresh machine: installs cargo-fuzz if missing. Only a stable toolchain is needed:
# cargo-fuzz's nightly flags are enabled with RUSTC_BOOTSTRAP=1.
#
# Environment: FUZZ_SANITIZER (address, the default; none for faster runs), FUZZ_JOBS (cargo
# build jobs), CARGO_FUZZ_VERSION (the cargo-fuzz installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TARGETS=(manifest safetensors config tokens ffi_set)
SECONDS_PER_TARGET=${1:-30}
if ! [[ "$SECONDS_PER_TARGET" =~ ^[0-9]+$ ]] || [ "$SECONDS_PER_TARGET" -lt 1 ]; then
  echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]   (targets: ${ALL_TARGETS[*]})" >&2
  exit 2
fi
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")
for t in "${TARGETS[@]}"; do
  if [[ ! " ${ALL_TARGETS[*]} " =~ " $t " ]]; then
    echo "unknown target '$t' (targets: ${ALL_TARGETS[*]})" >&2
    exit 2
  fi
done

# Longest input per target: room for the largest seed with some to spare, small enough that
# every execution stays fast.
max_len() {
  case "$1" in
    manifest) echo 16384 ;;
    safetensors) echo 32768 ;;
    config) echo 4096 ;;
    tokens) echo 4096 ;;
    ffi_set) echo 512 ;;
  esac
}

CARGO_FUZZ_VERSION=${CARGO_FUZZ_VERSION:-0.13.2}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
# cargo-fuzz passes -Z flags (sanitizers, coverage instrumentation); let stable rustc take them.
export RUSTC_BOOTSTRAP=1
SANITIZER=${FUZZ_SANITIZER:-address}
BUILD_ARGS=(--sanitizer "$SANITIZER")
[ -n "${FUZZ_JOBS:-}" ] && export CARGO_BUILD_JOBS=$FUZZ_JOBS

echo "== building fuzz targets (${TARGETS[*]}; sanitizer $SANITIZER)"
build_start=$(date +%s)
if [ ${#TARGETS[@]} -eq ${#ALL_TARGETS[@]} ]; then
  cargo fuzz build "${BUILD_ARGS[@]}"
else
  for t in "${TARGETS[@]}"; do cargo fuzz build "${BUILD_ARGS[@]}" "$t"; done
fi
echo "built in $(( $(date +%s) - build_start ))s"

LOGS=fuzz/artifacts/logs
mkdir -p "$LOGS"
summary=()
failed=0
for t in "${TARGETS[@]}"; do
  corpus=fuzz/corpus/$t
  artifacts=fuzz/artifacts/$t
  mkdir -p "$corpus" "$artifacts"
  cp -n fuzz/seeds/"$t"/* "$corpus"/ 2>/dev/null || true
  before=$(ls "$artifacts" | wc -l)
  log=$LOGS/$t.log
  echo "== fuzzing $t for ${SECONDS_PER_TARGET}s (log: $log)"
  start=$(date +%s)
  dict=()
  [ -f fuzz/dict/"$t".dict ] && dict=(-dict="fuzz/dict/$t.dict")
  set +e
  cargo fuzz run "${BUILD_ARGS[@]}" "$t" "$corpus" -- \
    -max_total_time="$SECONDS_PER_TARGET" \
    -timeout=10 \
    -rss_limit_mb=2048 \
    -malloc_limit_mb=2048 \
    -max_len="$(max_len "$t")" \
    -print_final_stats=1 \
    -artifact_prefix="$artifacts/" \
    "${dict[@]}" \
    >"$log" 2>&1
  rc=$?
  set -e
  elapsed=$(( $(date +%s) - start ))
  execs=$(grep -a -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)
  rss=$(grep -a -o 'stat::peak_rss_mb: *[0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)
  units=$(ls "$corpus" | wc -l)
  new_artifacts=$(( $(ls "$artifacts" | wc -l) - before ))
  outcome=ok
  if [ "$rc" -ne 0 ] || [ "$new_artifacts" -gt 0 ]; then
    failed=1
    outcome="FAILED (exit $rc)"
    grep -a -q 'ERROR: libFuzzer: timeout' "$log" && outcome="TIMEOUT (hang)"
    grep -a -q -e 'ERROR: libFuzzer: out-of-memory' -e 'malloc(.*) exceeds' "$log" && outcome="OUT OF MEMORY"
    grep -a -q 'ERROR: LeakSanitizer' "$log" && outcome="LEAK"
    grep -a -q -e 'panicked at' -e 'ERROR: AddressSanitizer' -e 'ERROR: libFuzzer: deadly signal' "$log" && outcome="CRASH"
    echo "---- last lines of $log"
    tail -n 40 "$log"
    echo "---- inputs saved in $artifacts/:"
    ls -t "$artifacts" | head -n 5
  fi
  summary+=("$(printf '%-12s %10s execs %6ss %6s MB peak %6s corpus  %s' \
    "$t" "${execs:-?}" "$elapsed" "${rss:-?}" "$units" "$outcome")")
done

echo
echo "== fuzz summary (${SECONDS_PER_TARGET}s per target)"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
  echo "fuzzing found failures: see fuzz/artifacts/" >&2
  exit 1
fi
