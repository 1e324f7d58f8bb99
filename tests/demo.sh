#!/usr/bin/env bash
# The main job (README, `make demo`): builds what is missing, brings up the local control plane,
# installs the CRD, starts the operator, applies the minimal example ChatService, waits until the
# operator has reconciled it, shows what it built, and tears everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
CACHE=${CHATOP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chat-operator}
bin=${CARGO_TARGET_DIR:-$root/target}/debug
kubectl=$CACHE/bin/kubectl
step() { printf '\n== %s\n' "$*"; }

step "installing the rig's servers (cached after the first run)"
bash tests/rig/install.sh

step "building the operator, the chat service and the rig"
cargo build --locked -p chat-rig -p chat-operator -p chat-service --bins

rig_file=$root/target/rig/demo-rig.json
rig_log=$root/target/rig/demo-rig.log
mkdir -p "$root/target/rig"
pids=()
cleanup() {
  step "tearing down"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$bin/rig" down --env-file "$rig_file" || true
}
trap cleanup EXIT

step "starting the local control plane, Redis, FerretDB and Ollama"
"$bin/rig" down --env-file "$rig_file" >/dev/null 2>&1 || true
"$bin/rig" up --env-file "$rig_file" >"$rig_log" 2>&1 &
rig_pid=$!
for _ in $(seq 1 600); do
  [ -f "$rig_file" ] && break
  kill -0 "$rig_pid" 2>/dev/null || { cat "$rig_log" >&2; echo "the rig failed to start" >&2; exit 1; }
  sleep 0.2
done
[ -f "$rig_file" ] || { echo "the rig did not come up within 120 s; see $rig_log" >&2; exit 1; }
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$rig_file" "$1"; }
export KUBECONFIG; KUBECONFIG=$(field kubeconfig)
ollama_url=$(field ollama_url)
"$kubectl" version

step "installing the ChatService CRD"
"$kubectl" apply --server-side -f crds/chatservice.yaml
"$kubectl" wait --for condition=Established --timeout=60s crd/chatservices.chatoperator.dev

step "starting the operator"
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUST_LOG=${RUST_LOG:-info,kube=warn} "$bin/chat-operator" \
  --metrics-address "127.0.0.1:$metrics_port" --disable-leader-election \
  >"$root/target/rig/demo-operator.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$metrics_port/healthz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$metrics_port/healthz" >/dev/null || {
  cat "$root/target/rig/demo-operator.log" >&2; echo "the operator did not become healthy" >&2; exit 1; }
echo "operator healthy (metrics on 127.0.0.1:$metrics_port)"

step "applying examples/minimal.yaml"
"$kubectl" create namespace demo --dry-run=client -o yaml | "$kubectl" apply -f -
# The example names an in-cluster Ollama Service; here the rig's Ollama answers instead.
sed "s#http://ollama.ai-models.svc.cluster.local:11434#$ollama_url#" examples/minimal.yaml |
  "$kubectl" apply -n demo -f -

step "waiting for the operator to reconcile it"
for _ in $(seq 1 150); do
  gen=$("$kubectl" get chatservice minimal -n demo -o jsonpath='{.metadata.generation}')
  seen=$("$kubectl" get chatservice minimal -n demo -o jsonpath='{.status.observedGeneration}')
  [ -n "$seen" ] && [ "$seen" = "$gen" ] && break
  sleep 0.2
done
[ "${seen:-}" = "$gen" ] || { tail -20 "$root/target/rig/demo-operator.log" >&2; echo "not reconciled" >&2; exit 1; }

"$kubectl" get chatservices -n demo
"$kubectl" get deployments,statefulsets,services,configmaps,secrets,serviceaccounts,poddisruptionbudgets,networkpolicies -n demo
"$kubectl" get chatservice minimal -n demo -o jsonpath='{range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{"\n"}{end}'
