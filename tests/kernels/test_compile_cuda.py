"""The conv kernels compile for an NVIDIA target (sm_90) without a GPU.

Triton's interpreter runs kernel bodies as Python, so it accepts code the compiler rejects
(a variable redefined with another shape inside a runtime branch, for one). Compiling here
catches that in CI, where no GPU exists. Each case runs in a subprocess because the test
session imports the kernels under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"

COMPILE = textwrap.dedent(
    """
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ascend_kernels import causal_conv1d

    case = json.loads(sys.argv[1])
    fn = getattr(causal_conv1d, case["kernel"])
    const = case["constexprs"]
    ints = set(case["int_pointers"])
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name in ints else "*bf16"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    """
)

INT_POINTERS = ["cu_ptr", "idx_ptr", "init_ptr"]
PREFILL = {"WIDTH": 4, "HAS_BIAS": True, "SILU": True, "BLOCK_T": 32, "BLOCK_D": 128,
           "WIDE": False, "EVEN_D": True}  # fmt: skip
CASES = [
    ("_conv_prefill_kernel", {**PREFILL, "SKIP_FIRST": 1, "BLOCK_B": 16}),
    ("_conv_prefill_kernel", {**PREFILL, "WIDTH": 2, "HAS_BIAS": False, "SILU": False,
                              "SKIP_FIRST": 0, "BLOCK_B": 1, "WIDE": True, "EVEN_D": False}),
    ("_conv_prefill_first_kernel", PREFILL),
    ("_conv_prefill_first_kernel", {**PREFILL, "WIDTH": 3, "WIDE": True, "EVEN_D": False}),
    ("_conv_update_kernel", {"WIDTH": 4, "HAS_BIAS": True, "SILU": True, "BLOCK_D": 512}),
    ("_conv_update_kernel", {"WIDTH": 2, "HAS_BIAS": False, "SILU": False, "BLOCK_D": 256}),
]  # fmt: skip


def _ptxas_available() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.parametrize(("kernel", "constexprs"), CASES)
def test_kernel_compiles_for_sm90(kernel, constexprs):
    if not _ptxas_available():
        pytest.skip("this Triton build ships no NVIDIA ptxas; cannot compile for sm_90 here")
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(KERNELS), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    case = {"kernel": kernel, "constexprs": constexprs, "int_pointers": INT_POINTERS}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(case)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
