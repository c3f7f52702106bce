#!/usr/bin/env bash
# End to end on kind, following docs/tutorials/qwen3-235b-*.md with the sim engine:
# a kind cluster whose workers advertise fake NPUs, the images built and loaded, the chart
# installed, the tutorial examples applied (engine sim, weights on a hostPath), Ready waited
# for, completions sent through the router (unified and PD), scaled, deleted, and nothing of
# ours left behind. Needs docker (with an engine), kind, kubectl, helm, and `make venv`.
#
#   make e2e-kind                      # or: bash tests/e2e/kind/run.sh
#   KEEP_CLUSTER=1 make e2e-kind       # leave the cluster for inspection
#
# Exit codes: 0 passed, 1 failed, 3 a prerequisite is missing (nothing was created).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."

CLUSTER="${CLUSTER:-ascend-serve-e2e}"
IMAGE_REGISTRY="${IMAGE_REGISTRY:-docker.io/ascendserve}"
VERSION="${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}"
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
RESOURCE="huawei.com/ascend-1980"
TIMEOUT="${TIMEOUT:-600s}"

missing() { echo "e2e-kind: $*" >&2; exit 3; }
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null 2>&1 || missing "$tool is not installed"
done
docker info >/dev/null 2>&1 || missing "docker cannot reach a Docker engine"
[[ -x "$PY" ]] || missing "$PY is missing: run make venv"

work="$(mktemp -d)"
forward_pid=""
cleanup() {
  if [[ -n "$forward_pid" ]]; then kill "$forward_pid" 2>/dev/null || true; fi
  if [[ -z "${KEEP_CLUSTER:-}" ]]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

# The tutorial's example with the sim engine and its weights on a node directory.
sim_copy() {
  "$PY" - "$1" "$2" <<'PY'
import sys

import yaml

doc = yaml.safe_load(open(sys.argv[1]))
spec = doc["spec"]
spec["runtime"]["engine"] = "sim"
path = spec["model"]["source"]["pvc"]["path"]
spec["model"]["source"] = {"hostPath": {"path": f"/models/{path}"}}
yaml.safe_dump(doc, open(sys.argv[2], "w"), sort_keys=False)
PY
}

# A completion through the deployment's router Service; prints the answer.
complete() {
  local name="$1" port=18000
  kubectl -n llm port-forward "svc/$name" "$port:8000" >"$work/forward.log" 2>&1 &
  forward_pid=$!
  for _ in $(seq 1 50); do
    if curl -sf "localhost:$port/v1/models" >/dev/null 2>&1; then break; fi
    sleep 0.2
  done
  curl -sf "localhost:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "qwen3-235b-a22b", "prompt": "The capital of France is", "max_tokens": 16}' \
    | tee "$work/answer.json"
  echo
  "$PY" -c 'import json, sys; assert json.load(open(sys.argv[1]))["choices"][0]["text"]' "$work/answer.json"
  kill "$forward_pid"
  wait "$forward_pid" 2>/dev/null || true
  forward_pid=""
}

ready() {
  kubectl -n llm wait "md/$1" --for=jsonpath='{.status.phase}'=Ready --timeout="$TIMEOUT"
  kubectl -n llm get md "$1"
}

step "kind cluster with three workers"
kind create cluster --name "$CLUSTER" --config tests/e2e/kind/kind-config.yaml --wait 180s

step "fake NPU nodes: Ascend driver files and $RESOURCE capacity"
for node in $(kind get nodes --name "$CLUSTER"); do
  [[ "$node" == *control-plane ]] && continue
  docker exec "$node" sh -c 'mkdir -p /usr/local/dcmi /usr/local/Ascend/driver/lib64 /models/Qwen3-235B-A22B \
    && touch /usr/local/bin/npu-smi /usr/local/Ascend/driver/version.info /etc/ascend_install.info /etc/hccn.conf'
  kubectl patch node "$node" --subresource=status --type=json \
    -p "[{\"op\": \"add\", \"path\": \"/status/capacity/${RESOURCE/\//~1}\", \"value\": \"16\"}]"
done
kubectl get nodes -o custom-columns='NODE:.metadata.name,NPU:.status.allocatable.huawei\.com/ascend-1980'

step "build and load the images"
make images-cpu IMAGE_REGISTRY="$IMAGE_REGISTRY"
for image in operator runtime-cpu; do
  kind load docker-image "$IMAGE_REGISTRY/$image:$VERSION" --name "$CLUSTER"
done

step "install the operator (tutorial: Install the operator)"
helm install ascend-serve charts/ascend-serve --namespace ascend-serve --create-namespace \
  --set image.repository="$IMAGE_REGISTRY/operator" --set image.tag="$VERSION" \
  --set image.pullPolicy=Never --set runtimeImageRegistry="$IMAGE_REGISTRY"
kubectl -n ascend-serve rollout status deployment/ascend-serve
kubectl get crd modeldeployments.ascendserve.dev
kubectl create namespace llm

step "one node (tutorial: qwen3-235b-single-node), sim engine"
sim_copy examples/qwen3-235b-a3-single-node.yaml "$work/single.yaml"
kubectl apply -n llm -f "$work/single.yaml"
ready qwen3-235b
complete qwen3-235b

step "scale to two instances and back"
kubectl -n llm scale md qwen3-235b --replicas 2
kubectl -n llm wait md/qwen3-235b --for=jsonpath='{.status.roles[0].readyInstances}'=2 --timeout="$TIMEOUT"
complete qwen3-235b
kubectl -n llm scale md qwen3-235b --replicas 1
kubectl -n llm wait md/qwen3-235b --for=jsonpath='{.status.roles[0].readyInstances}'=1 --timeout="$TIMEOUT"
kubectl -n llm delete md qwen3-235b --wait

step "PD on three nodes (tutorial: qwen3-235b-multi-node, part 2), sim engine"
sim_copy examples/qwen3-235b-pd.yaml "$work/pd.yaml"
kubectl apply -n llm -f "$work/pd.yaml"
ready qwen3-235b-pd
complete qwen3-235b-pd
kubectl -n llm delete md qwen3-235b-pd --wait

step "nothing of ours is left in the namespace"
for _ in $(seq 1 60); do
  left="$(kubectl -n llm get all,configmaps,serviceaccounts,roles,rolebindings,poddisruptionbudgets,endpointslices \
    -l app.kubernetes.io/part-of=ascend-serve -o name)"
  [[ -z "$left" ]] && break
  sleep 2
done
if [[ -n "$left" ]]; then
  echo "left behind:"; echo "$left"; exit 1
fi
echo "e2e-kind: passed"
