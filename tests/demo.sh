#!/usr/bin/env bash
# The main job (README, `make demo`): a local cluster whose pods really run, the operator installed
# with its Helm chart and running as a pod, the minimal example ChatService reconciled into running
# chat-service, Redis and MongoDB (FerretDB) pods, and one chat turn answered by Gemma through the
# chat Service's ClusterIP. Then everything is torn down. Non-interactive; needs root (network
# namespaces) and the rig's servers (tests/rig/install.sh, run first).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
CACHE=${CHATOP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chat-operator}
target=${CARGO_TARGET_DIR:-$root/target}
case $target in /*) ;; *) target=$root/$target ;; esac
bin=$target/debug
kubectl=$CACHE/bin/kubectl
helm=$CACHE/bin/helm
t0=$(date +%s.%N)
t_step=$t0
timings=()
step() {
  local now; now=$(date +%s.%N)
  [ -n "${step_name:-}" ] && timings+=("$(printf '%6.1f s  %s' "$(awk "BEGIN{print $now - $t_step}")" "$step_name")")
  t_step=$now
  step_name=$*
  printf '\n== %s\n' "$*"
}
die() { echo "demo: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "the local node creates network namespaces and bind mounts: run as root"

step "installing the rig's servers (cached after the first run)"
bash tests/rig/install.sh

step "building the operator, the chat service and the rig"
cargo build --locked -p chat-rig -p chat-operator -p chat-service --bins

rundir=$target/rig
rig_file=$rundir/demo-rig.json
rig_log=$rundir/demo-rig.log
node_log=$rundir/demo-node.log
mkdir -p "$rundir"
rig_pid=""
node_pid=""
cleanup() {
  local rc=$?
  step "tearing down"
  if [ -n "${KUBECONFIG:-}" ] && [ -n "$node_pid" ] && kill -0 "$node_pid" 2>/dev/null; then
    "$kubectl" delete chatservice minimal -n demo --ignore-not-found --wait=true --timeout=60s || true
    # The owner's garbage collector removes the children; the node stops their processes.
    for _ in $(seq 1 120); do
      [ -z "$("$kubectl" get pods -n demo -o name 2>/dev/null)" ] && break
      sleep 0.5
    done
    echo "pods left in namespace demo: $("$kubectl" get pods -n demo -o name 2>/dev/null | wc -l)"
    "$helm" uninstall chat-operator -n chat-operator --wait --timeout 60s >/dev/null 2>&1 || true
  fi
  if [ -n "$node_pid" ]; then
    kill -TERM "$node_pid" 2>/dev/null || true
    wait "$node_pid" 2>/dev/null || true
    echo "node stopped: $(tail -1 "$node_log")"
    left=$(ip netns list | grep -c '^chatop-' || true)
    echo "pod network namespaces left: $left"
  fi
  "$bin/rig" down --env-file "$rig_file" || true
  step "done"
  echo
  echo "timings:"
  printf '  %s\n' "${timings[@]}"
  printf '%6.1f s  total\n' "$(awk "BEGIN{print $(date +%s.%N) - $t0}")"
  exit $rc
}
trap cleanup EXIT

step "starting the local control plane, Redis, FerretDB and Ollama"
"$bin/rig" down --env-file "$rig_file" >/dev/null 2>&1 || true
"$bin/rig" up --env-file "$rig_file" >"$rig_log" 2>&1 &
rig_pid=$!
for _ in $(seq 1 900); do
  [ -f "$rig_file" ] && break
  kill -0 "$rig_pid" 2>/dev/null || { cat "$rig_log" >&2; die "the rig failed to start"; }
  sleep 0.2
done
[ -f "$rig_file" ] || die "the rig did not come up within 180 s; see $rig_log"
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$rig_file" "$1"; }
export KUBECONFIG; KUBECONFIG=$(field kubeconfig)
ollama_port=$(field ollama_url | sed 's#.*:##')
"$kubectl" version

step "starting the local node (kubelet, scheduler, service proxy and DNS stand-in)"
"$bin/rig" node --kubeconfig "$KUBECONFIG" >"$node_log" 2>&1 &
node_pid=$!
for _ in $(seq 1 150); do
  grep -q "is up" "$node_log" 2>/dev/null && break
  kill -0 "$node_pid" 2>/dev/null || { cat "$node_log" >&2; die "the node failed to start"; }
  sleep 0.2
done
"$kubectl" wait --for=condition=Ready node/rig-node --timeout=60s
node_ip=$("$kubectl" get node rig-node -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
"$kubectl" get nodes -o wide

step "installing the operator with its Helm chart (it runs as a pod)"
"$helm" install chat-operator charts/chat-operator -n chat-operator --create-namespace \
  --wait --timeout 180s || {
  "$kubectl" get pods -n chat-operator -o wide >&2
  tail -30 "$node_log" >&2
  die "the chart did not become ready"
}
"$kubectl" get pods -n chat-operator -o wide

step "publishing the shared Ollama as ollama.ai-models (a Service without selector)"
# The example names http://ollama.ai-models.svc.cluster.local:11434. Here that Service has a
# manual EndpointSlice whose address is the node's IP: the node's proxy dials the host's own
# servers (the rig's Ollama on 127.0.0.1:$ollama_port) for it.
"$kubectl" apply -f - <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: ai-models
---
apiVersion: v1
kind: Service
metadata:
  name: ollama
  namespace: ai-models
spec:
  ports:
    - name: http
      port: 11434
      targetPort: $ollama_port
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ollama-rig
  namespace: ai-models
  labels:
    kubernetes.io/service-name: ollama
    endpointslice.kubernetes.io/managed-by: chat-rig-demo
addressType: IPv4
ports:
  - name: http
    port: $ollama_port
    protocol: TCP
endpoints:
  - addresses: ["$node_ip"]
    conditions:
      ready: true
EOF

step "applying examples/minimal.yaml in namespace demo (model smollm2:135m, answers capped at 48 tokens)"
"$kubectl" create namespace demo --dry-run=client -o yaml | "$kubectl" apply -f -
# As written, except two local patches: the model is the rig's instruction-tuned SmolLM2-135M
# (the example names the Gemma 3 270M base model the tests use, which only continues the prompt),
# and answers are capped at 48 tokens so one turn on two busy cores stays short.
"$kubectl" patch --local -f examples/minimal.yaml --type merge \
  -p '{"spec":{"models":{"default":"smollm2:135m"},"context":{"maxOutputTokens":48}}}' -o yaml |
  "$kubectl" apply -n demo -f -

step "waiting for ChatService minimal to be Ready"
"$kubectl" wait -n demo --for=condition=Ready=True chatservice/minimal --timeout=300s || {
  "$kubectl" get chatservice minimal -n demo -o jsonpath='{range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{"\n"}{end}' >&2
  "$kubectl" get pods -n demo -o wide >&2
  die "ChatService minimal did not become Ready"
}
"$kubectl" get pods -n demo -o wide
"$kubectl" get chatservice minimal -n demo -o jsonpath='{range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{"\n"}{end}'

step "one chat turn through the chat Service's ClusterIP"
ip=$("$kubectl" get service minimal -n demo -o jsonpath='{.spec.clusterIP}')
port=$("$kubectl" get service minimal -n demo -o jsonpath='{.spec.ports[0].port}')
echo "POST http://$ip:$port/v1/chat"
reply=$(curl -fsS --max-time 600 -H 'content-type: application/json' \
  -d '{"message": "Write one short sentence about the sea."}' "http://$ip:$port/v1/chat") ||
  die "the chat turn failed"
python3 -c '
import json, sys
r = json.loads(sys.argv[1])
print("session:", r["session_id"])
print("model:  ", r["model"], "| tokens:", r["usage"])
print("reply:  ", r["message"].strip()[:600])
' "$reply"
echo
"$kubectl" get chatservices -A
