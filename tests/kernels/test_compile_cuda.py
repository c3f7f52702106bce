"""The conv and GDN prefill kernels compile for an NVIDIA target (sm_90) without a GPU.

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
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    case = json.loads(sys.argv[1])
    fn = getattr(importlib.import_module(case["module"]), case["kernel"])
    # "tl.<name>" stands for a Triton dtype (JSON carries no dtypes)
    const = {k: getattr(triton.language, v[3:]) if isinstance(v, str) and v.startswith("tl.")
             else v for k, v in case["constexprs"].items()}
    ints, fp32 = set(case["int_pointers"]), set(case["fp32_pointers"])
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name in ints else "*fp32" if name in fp32 else "*bf16"
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    """
)

INT_POINTERS = ["cu_ptr", "idx_ptr", "init_ptr", "off_ptr"]
FP32_POINTERS = ["g_ptr", "beta_ptr", "w_ptr", "u_ptr", "gc_ptr", "t_ptr", "h0_ptr", "ht_ptr"]
CONV = "ascend_kernels.causal_conv1d"
GDN = "ascend_kernels.gdn_prefill"
GDN_TILES = {"K": 128, "BK": 128, "PREC": "tf32"}
GDN_LOW = {"OPD": "tl.bfloat16", "EMULATE": False}  # 16-bit products (LOW_PRECISION)
GDN_FP32 = {"OPD": "tl.float32", "EMULATE": False}
PREFILL = {"WIDTH": 4, "HAS_BIAS": True, "SILU": True, "BLOCK_T": 32, "BLOCK_D": 128,
           "WIDE": False, "EVEN_D": True}  # fmt: skip
CASES = [
    (CONV, "_conv_prefill_kernel", {**PREFILL, "SKIP_FIRST": 1, "BLOCK_B": 16}),
    (CONV, "_conv_prefill_kernel", {**PREFILL, "WIDTH": 2, "HAS_BIAS": False, "SILU": False,
                                    "SKIP_FIRST": 0, "BLOCK_B": 1, "WIDE": True,
                                    "EVEN_D": False}),
    (CONV, "_conv_prefill_first_kernel", PREFILL),
    (CONV, "_conv_prefill_first_kernel", {**PREFILL, "WIDTH": 3, "WIDE": True, "EVEN_D": False}),
    (CONV, "_conv_update_kernel", {"WIDTH": 4, "HAS_BIAS": True, "SILU": True, "BLOCK_D": 512}),
    (CONV, "_conv_update_kernel", {"WIDTH": 2, "HAS_BIAS": False, "SILU": False, "BLOCK_D": 256}),
    (GDN, "_wy_kernel", {**GDN_TILES, **GDN_LOW, "V": 128, "BV": 64, "SPREC": "tf32",
                         "KDT": "tl.bfloat16"}),
    (GDN, "_wy_kernel", {**GDN_TILES, **GDN_FP32, "V": 128, "BV": 64, "SPREC": "ieee",
                         "KDT": "tl.float32"}),
    (GDN, "_t_kernel", {**GDN_TILES, "SPREC": "ieee", "KDT": "tl.float32", "EMULATE": False}),
    (GDN, "_wu_kernel", {**GDN_TILES, "V": 128, "BV": 64}),
    (GDN, "_state_kernel", {**GDN_TILES, **GDN_LOW, "V": 128, "BV": 32, "HAS_H0": True,
                            "STORE_HT": True}),
    (GDN, "_state_kernel", {**GDN_TILES, **GDN_FP32, "V": 128, "BV": 64, "HAS_H0": True,
                            "STORE_HT": True}),
    (GDN, "_output_kernel", {**GDN_TILES, **GDN_LOW, "V": 128, "BV": 64}),
    (GDN, "_output_kernel", {**GDN_TILES, **GDN_FP32, "V": 128, "BV": 64}),
]  # fmt: skip


def _ptxas_available() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.parametrize(("module", "kernel", "constexprs"), CASES)
def test_kernel_compiles_for_sm90(module, kernel, constexprs):
    if not _ptxas_available():
        pytest.skip("this Triton build ships no NVIDIA ptxas; cannot compile for sm_90 here")
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(KERNELS), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    case = {"module": module, "kernel": kernel, "constexprs": constexprs,
            "int_pointers": INT_POINTERS, "fp32_pointers": FP32_POINTERS}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(case)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
