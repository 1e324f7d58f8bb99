#!/usr/bin/env bash
# Runs every fuzz target of chat-service/fuzz (a workspace of its own) for a bounded time from its
# committed corpus; a crash fails the run and names the input that crashed. The last step of
# tests/run-tests.sh; also usable alone: CHATOP_FUZZ_SECONDS=300 bash tests/fuzz.sh [target ...]
#
# libFuzzer needs nightly flags: the pinned stable toolchain allows them with RUSTC_BOOTSTRAP=1.
# The build (release, instrumented) keeps its target dir in the cache, so a second run rebuilds
# only the service's own crates.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
CACHE=${CHATOP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chat-operator}
seconds=${CHATOP_FUZZ_SECONDS:-12}
cargo_fuzz=$CACHE/bin/cargo-fuzz
[ -x "$cargo_fuzz" ] || { echo "cargo-fuzz is missing: run 'bash tests/rig/install.sh cargo-fuzz'" >&2; exit 1; }
flags=(-s none --codegen-units 16 --target-dir "${CHATOP_FUZZ_TARGET_DIR:-$CACHE/fuzz-target}")
fuzz() { (cd chat-service/fuzz && RUSTC_BOOTSTRAP=1 "$cargo_fuzz" fuzz "$@"); }

start=$SECONDS
fuzz build "${flags[@]}"
echo "fuzz build: $((SECONDS - start)) s"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(fuzz list)
out=$root/target/fuzz
for target in "${targets[@]}"; do
  # New inputs go to a scratch corpus (the first directory), never into the committed one.
  mkdir -p "$out/corpus/$target"
  log=$out/$target.log
  if ! fuzz run "${flags[@]}" "$target" "$out/corpus/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz target $target FAILED (log: $log); crash input: $(ls -d "$root"/chat-service/fuzz/artifacts/"$target"/* 2>/dev/null | tr '\n' ' ')" >&2
    echo "reproduce: cd chat-service/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s none $target <input>" >&2
    exit 1
  fi
  echo "$target: $(sed -n 's/^stat::number_of_executed_units: *//p' "$log") runs in $seconds s, $(ls "$out/corpus/$target" | wc -l) inputs in the scratch corpus"
done
echo "fuzzing: $((SECONDS - start)) s"
