#!/usr/bin/env bash
# The project's test command (README, `make test`, CI): installs what the tests need (cached),
# checks formatting and lints, starts one shared rig, runs every test against it, and stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
CACHE=${CHATOP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chat-operator}
bin=${CARGO_TARGET_DIR:-$root/target}/debug

bash tests/rig/install.sh

# A one-off build gains nothing from incremental state, which would take several GB of disk.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi

# The real-node tests (chat-rig's kubelet_node and node) each start a private control plane and
# the machine's one kubelet node; the shared rig below starts no node. A node left by a killed
# run would make them fail: say so up front.
if [ -e /run/chatop-kubelet ] || ip link show chatop-cni0 >/dev/null 2>&1; then
  echo "a real node runs on this machine (or a killed one left /run/chatop-kubelet or chatop-cni0): stop it first" >&2
  exit 1
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== building tests"
cargo build --workspace --all-targets --locked

rig_file=$root/target/rig/test-rig.json
rig_log=$root/target/rig/test-rig.log
mkdir -p "$root/target/rig"
"$bin/rig" down --env-file "$rig_file" >/dev/null 2>&1 || true
"$bin/rig" up --env-file "$rig_file" >"$rig_log" 2>&1 &
rig_pid=$!
stop_rig() { "$bin/rig" down --env-file "$rig_file" >/dev/null 2>&1 || kill "$rig_pid" 2>/dev/null || true; }
trap stop_rig EXIT
for _ in $(seq 1 600); do
  [ -f "$rig_file" ] && break
  if ! kill -0 "$rig_pid" 2>/dev/null; then
    echo "the test rig failed to start; its output ($rig_log):" >&2
    cat "$rig_log" >&2
    exit 1
  fi
  sleep 0.2
done
[ -f "$rig_file" ] || { echo "the test rig did not come up within 120 s; see $rig_log" >&2; exit 1; }
grep -m1 '^\[rig\] up' "$rig_log" || true

export CHATOP_RIG_ENV=$rig_file
export CHATOP_PYTHON=$CACHE/venv/bin/python
echo "== cargo test"
cargo test --workspace --locked --no-fail-fast -- "$@"

stop_rig
echo "== cargo fuzz (${CHATOP_FUZZ_SECONDS:-12} s per target)"
bash tests/fuzz.sh
