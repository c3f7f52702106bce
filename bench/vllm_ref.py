"""vLLM's own Triton kernels, for side-by-side timing in bench/kernels.py without installing
vLLM (the GPU machine has no network, and vLLM's wheel is hundreds of MB).

`prepare` copies the Python modules of the kernels we compare out of a vLLM wheel into an
ignored folder (bench/.vllm/, never committed), next to a few small modules that stand in for
the parts of vLLM those files import (`vllm.triton_utils`, `vllm.platforms`, constants). The
kernels themselves are vLLM's code, unchanged.

    python bench/vllm_ref.py [--version 0.33.0]     # downloads the wheel with pip (cached)
    python bench/kernels.py --vllm bench/.vllm      # on the GPU machine (carry bench/.vllm)
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / "bench" / ".vllm"
WHEEL_CACHE = ROOT / ".cache" / "vllm-wheel"

FLA = "vllm/third_party/flash_linear_attention/ops"
KERNEL_FILES = [
    *(f"{FLA}/{name}.py" for name in (
        "chunk", "chunk_delta_h", "chunk_o", "chunk_scaled_dot_kkt", "cumsum", "fused_recurrent",
        "index", "l2norm", "op", "solve_tril", "utils", "wy_fast",
    )),
    "vllm/model_executor/layers/mamba/ops/causal_conv1d.py",
    "vllm/v1/attention/ops/triton_reshape_and_cache_flash.py",
]  # fmt: skip

_PLATFORM = '''
import torch


class _Platform:
    """What the copied kernels ask of vLLM's platform object, answered for this machine."""

    def is_cuda(self):
        return torch.cuda.is_available() and torch.version.hip is None

    def is_cuda_alike(self):
        return torch.cuda.is_available()

    def is_rocm(self):
        return torch.version.hip is not None

    def is_xpu(self):
        return False

    def is_cpu(self):
        return False  # the Triton kernels are what is compared, also under the interpreter

    def get_device_capability(self):
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor

    def has_device_capability(self, capability):
        return self.is_cuda_alike() and self.get_device_capability() >= capability

    def is_device_capability_family(self, capability):
        return self.is_cuda_alike() and self.get_device_capability() // 10 == capability // 10

    def is_arch_support_pdl(self):
        return self.is_cuda() and self.get_device_capability() >= 90

    def fp8_dtype(self):
        return torch.float8_e4m3fn


current_platform = _Platform()
'''

SHIMS = {
    "vllm/triton_utils/__init__.py": (
        "import triton\nimport triton.language as tl\n"
        "import triton.language.extra.libdevice as tldevice\n"
        "LOG2E = 1.4426950408889634\nLOGE2 = 0.6931471805599453\n"
    ),
    "vllm/platforms/__init__.py": _PLATFORM,
    "vllm/platforms/rocm.py": "def on_gfx1x():\n    return False\n",
    "vllm/utils/gpu_sync_debug.py": (
        "import contextlib\n\n\n@contextlib.contextmanager\n"
        "def gpu_sync_allowed(*args, **kwargs):\n    yield\n"
    ),
    "vllm/utils/torch_utils.py": (
        "import torch\n\n\ndef async_tensor_h2d(data, dtype=None, device=None, **kwargs):\n"
        "    return torch.tensor(data, dtype=dtype, device='cpu').to(device, non_blocking=True)\n"
    ),
    "vllm/utils/math_utils.py": (
        "import math\nRCP_LN2 = 1.0 / math.log(2.0)\n\n\ndef cdiv(a, b):\n"
        "    return -(a // -b)\n\n\ndef next_power_of_2(n):\n"
        "    return 1 if n < 1 else 1 << (n - 1).bit_length()\n"
    ),
    "vllm/v1/attention/backends/utils.py": "PAD_SLOT_ID = -1\nNULL_BLOCK_ID = 0\n",
    "vllm/v1/kv_cache_interface.py": (
        "import enum\n\n\nclass KVQuantMode(enum.IntEnum):\n    NONE = 0\n    FP8_PER_TENSOR = 1\n"
        "    INT8_PER_TOKEN_HEAD = 2\n    FP8_PER_TOKEN_HEAD = 3\n\n\n"
        "def is_quantized_kv_cache(kv_cache_dtype):\n"
        "    return kv_cache_dtype not in ('auto', 'float16', 'bfloat16', 'float32', 'half', "
        "'float')\n"
    ),
    "vllm/model_executor/layers/quantization/utils/quant_utils.py": (
        "import torch\nFP8_DTYPE = torch.float8_e4m3fn\n\n\ndef get_fp8_min_max():\n"
        "    info = torch.finfo(FP8_DTYPE)\n    return info.min, info.max\n"
    ),
}


def find_wheel(version: str) -> Path:
    """vLLM's wheel of `version`, downloaded with pip once (no dependencies)."""
    found = sorted(WHEEL_CACHE.glob(f"vllm-{version}-*.whl"))
    if found:
        return found[-1]
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps",
         "-d", str(WHEEL_CACHE), "-q"],
        check=True,
    )  # fmt: skip
    return sorted(WHEEL_CACHE.glob(f"vllm-{version}-*.whl"))[-1]


def prepare(wheel: Path, dest: Path = DEFAULT_DEST) -> Path:
    """Copy the kernels out of `wheel` into `dest` with the stand-in modules; returns dest."""
    with zipfile.ZipFile(wheel) as zf:
        for name in KERNEL_FILES:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    for name, source in SHIMS.items():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source)
    # every package on the way gets an empty __init__ (the real ones import all of vLLM)
    for path in list(dest.rglob("*.py")):
        for parent in path.relative_to(dest).parents:
            init = dest / parent / "__init__.py"
            if parent != Path(".") and not init.exists():
                init.write_text("")
    (dest / "VERSION").write_text(wheel.name + "\n")
    return dest


def load(dest: Path) -> dict[str, ModuleType]:
    """Import the copied kernels from `dest` (put first on sys.path)."""
    sys.path.insert(0, str(dest))
    return {
        "fla_chunk": importlib.import_module(f"{FLA.replace('/', '.')}.chunk"),
        "fla_recurrent": importlib.import_module(f"{FLA.replace('/', '.')}.fused_recurrent"),
        "conv": importlib.import_module("vllm.model_executor.layers.mamba.ops.causal_conv1d"),
        "cache": importlib.import_module("vllm.v1.attention.ops.triton_reshape_and_cache_flash"),
    }


def version_of(dest: Path) -> str:
    return (dest / "VERSION").read_text().strip()


# --------------------------------------------------------------------------- adapters
Mods = dict[str, ModuleType]
Pair = tuple[Callable[[], Any], Callable[[Any], Any]]
# Each takes our benchmark's tensors (our layouts) and returns a zero-argument call of vLLM's
# kernel on the same data, set up as vLLM sets it up (metadata built once per step, outside the
# timed call), and a function giving its output in our layout for the comparison.


def _conv_metadata(cu: Any, device: Any, block_m: int = 8) -> Any:
    """The per-step metadata vLLM's attention builder makes for causal_conv1d_fn."""
    import torch

    seqlens = cu.cpu().diff()
    chunks = (-(-seqlens // block_m)).tolist()
    mlist = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(chunks))
    offsets = torch.cat([torch.arange(n) for n in chunks])
    size = max(1024, len(mlist)) * 2
    batch_ptr = torch.full((size,), -1, dtype=torch.int32, device=device)
    chunk_ptr = torch.full((size,), -1, dtype=torch.int32, device=device)
    batch_ptr[: len(mlist)] = mlist.to(device=device, dtype=torch.int32)
    chunk_ptr[: len(mlist)] = offsets.to(device=device, dtype=torch.int32)
    entry = {"nums": torch.tensor(chunks), "tot": sum(chunks), "mlist": mlist,
             "mlist_len": len(mlist), "offsetlist": offsets, "batch_ptr": batch_ptr,
             "token_chunk_offset_ptr": chunk_ptr}  # fmt: skip
    return SimpleNamespace(nums_dict={block_m: entry}, batch_ptr=batch_ptr,
                           token_chunk_offset_ptr=chunk_ptr)  # fmt: skip


def conv_prefill(mods: Mods, *, x: Any, w: Any, bias: Any, cu: Any, states: Any, idx: Any,
                 init: Any) -> Pair:  # fmt: skip
    """vLLM's causal_conv1d_fn: x channel-last (dim, tokens), as Qwen3-Next passes it."""
    meta = _conv_metadata(cu, x.device)
    xt = x.t()

    def run() -> Any:
        return mods["conv"].causal_conv1d_fn(
            xt, w, bias, states, cu, cache_indices=idx, has_initial_state=init,
            activation="silu", metadata=meta,
        )  # fmt: skip

    return run, lambda out: out.t()


def conv_update(mods: Mods, *, x: Any, states: Any, w: Any, idx: Any) -> Pair:
    """vLLM's causal_conv1d_update: x (batch, dim) for one token, (batch, dim, steps) else."""
    steps = x.shape[1]
    xv = x[:, 0] if steps == 1 else x.transpose(1, 2)
    out = torch_empty_like(xv)

    def run() -> Any:
        return mods["conv"].causal_conv1d_update(
            xv, states, w, None, activation="silu", conv_state_indices=idx, out=out
        )

    return run, (lambda o: o.unsqueeze(1)) if steps == 1 else (lambda o: o.transpose(1, 2))


def gdn_prefill(mods: Mods, *, q: Any, k: Any, v: Any, g: Any, beta: Any, cu: Any,
                h0: Any) -> Pair:  # fmt: skip
    """vLLM's FLA chunk_gated_delta_rule (q, k with fewer heads than v), its chunk indices
    precomputed as vLLM's metadata does; the state in vLLM's [N, H, V, K] layout."""
    chunk = mods["fla_chunk"]
    index = importlib.import_module(f"{FLA.replace('/', '.')}.index")
    utils = importlib.import_module(f"{FLA.replace('/', '.')}.utils")
    indices = index.prepare_chunk_indices(cu, utils.FLA_CHUNK_SIZE)
    offsets = index.prepare_chunk_offsets(cu, utils.FLA_CHUNK_SIZE)
    state = h0.transpose(-1, -2).contiguous()
    args = (q[None], k[None], v[None], g[None], beta[None])

    def run() -> Any:
        return chunk.chunk_gated_delta_rule(
            *args, initial_state=state, output_final_state=True, cu_seqlens=cu,
            chunk_indices=indices, chunk_offsets=offsets,
        )  # fmt: skip

    return run, lambda out: out[0][0]


def gdn_decode(mods: Mods, *, q: Any, k: Any, v: Any, g: Any, beta: Any, states: Any,
               idx: Any) -> Pair:  # fmt: skip
    """vLLM's fused_recurrent_gated_delta_rule, one token per sequence, states in place."""
    import torch

    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    state = states.transpose(-1, -2).contiguous()
    args = (q[None], k[None], v[None], g[None], beta[None])

    def run() -> Any:
        return mods["fla_recurrent"].fused_recurrent_gated_delta_rule(
            *args, initial_state=state, inplace_final_state=True, cu_seqlens=cu,
            ssm_state_indices=idx,
        )  # fmt: skip

    return run, lambda out: out[0][0]


def reshape_and_cache(mods: Mods, *, key: Any, value: Any, key_cache: Any, value_cache: Any,
                      slots: Any) -> Callable[[], Any]:  # fmt: skip
    """vLLM's triton_reshape_and_cache_flash into caches of the same shape as ours."""
    import torch

    one = torch.ones((), dtype=torch.float32, device=key.device)

    def run() -> Any:
        return mods["cache"].triton_reshape_and_cache_flash(
            key, value, key_cache, value_cache, slots, "auto", one, one
        )

    return run


def torch_empty_like(t: Any) -> Any:
    import torch

    return torch.empty_like(t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="0.33.0")
    parser.add_argument("--wheel", type=Path, help="a vLLM wheel already on disk")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    args = parser.parse_args()
    dest = prepare(args.wheel or find_wheel(args.version), args.dest)
    print(f"vLLM kernels from {version_of(dest)} in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
