#!/usr/bin/env bash
# The main job in one command: run examples/tiny-sim.yaml with `ascend-serve up` (sim engine,
# router on localhost), send it a real OpenAI request, print the answer, stop everything.
# Usage: scripts/demo.sh [VENV_DIR] [EXAMPLE] [PORT]
set -euo pipefail
venv="${1:-.venv}"
example="${2:-examples/tiny-sim.yaml}"
port="${3:-8000}"
log="$(mktemp -t ascend-serve-demo.XXXXXX)"

"$venv/bin/ascend-serve" up -f "$example" --port "$port" >"$log" 2>&1 &
up_pid=$!
trap 'kill -INT "$up_pid" 2>/dev/null; wait "$up_pid" 2>/dev/null || true' EXIT

for _ in $(seq 1 120); do
  if grep -q '^endpoint:' "$log"; then break; fi
  if ! kill -0 "$up_pid" 2>/dev/null; then cat "$log"; exit 1; fi
  sleep 0.5
done
grep -E '^(ascend-serve up|endpoint)' "$log"

model="$("$venv/bin/python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["spec"]["model"]["name"])' "$example")"
echo "\$ curl http://127.0.0.1:$port/v1/completions -d '{\"model\": \"$model\", \"prompt\": \"Ascend NPUs serve\", \"max_tokens\": 12}'"
"$venv/bin/python" - "$port" "$model" <<'PY'
import json, sys, urllib.request

port, model = sys.argv[1], sys.argv[2]
body = json.dumps({"model": model, "prompt": "Ascend NPUs serve", "max_tokens": 12}).encode()
request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=30) as response:
    answer = json.load(response)
print(json.dumps(answer, indent=2))
assert answer["choices"][0]["text"], "empty completion"
PY
