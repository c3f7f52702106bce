"""The sim engine's bookkeeping per sequence per step as the running batch grows: the
scheduler must cost O(1) per sequence (it once cost O(batch), so 576 sequences spent more on
bookkeeping than the step they simulated). Runs the virtual clock with a fixed step time, so
all wall time is the engine's own; reports microseconds per (sequence x step) at each batch
size and the ratio of the largest to the smallest, side by side in one run.

    python bench/sim_scale.py [--output bench/results/sim_scale.json]
    python bench/sim_scale.py --tiny
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _common import cpu_device, write_result  # noqa: E402

from ascend_runtime.config import SimSettings  # noqa: E402
from ascend_runtime.sim.virtual import VirtualRun  # noqa: E402


def per_sequence_step_us(batch: int, output_len: int) -> tuple[float, int]:
    settings = SimSettings(
        block_size=128, num_blocks=1 << 20, max_num_seqs=batch, max_num_batched_tokens=1 << 20,
        fixed_ttft_seconds=0.01, fixed_itl_seconds=0.01,
    )  # fmt: skip
    run = VirtualRun({"unified": (settings, 1)})
    started = time.perf_counter()
    run.run([(128, output_len)] * batch, concurrency=batch, request_rate=math.inf)
    wall = time.perf_counter() - started
    steps = run.engines[0][1].steps
    return 1e6 * wall / (steps * batch), steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "sim_scale.json"))
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    batches = (16, 64) if args.tiny else (128, 256, 512, 1024)
    output_len = 16 if args.tiny else 256
    rows = []
    for batch in batches:
        us, steps = per_sequence_step_us(batch, output_len)
        rows.append(
            {"running_sequences": batch, "steps": steps, "us_per_sequence_step": round(us, 3)}
        )
        print(f"{batch:5d} running: {us:7.2f} us per sequence per step ({steps} steps)")
    ratio = rows[-1]["us_per_sequence_step"] / rows[0]["us_per_sequence_step"]
    print(f"cost per sequence-step at {batches[-1]} vs {batches[0]}: x{ratio:.2f} (O(1): about 1)")
    write_result(
        args.output,
        {"benchmark": "sim_scale", "device": cpu_device("the sim engine's own bookkeeping"),
         "tiny": args.tiny, "results": rows, "largest_over_smallest": round(ratio, 3)},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
