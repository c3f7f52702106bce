"""Grid and tile sizing from the device."""

from __future__ import annotations

import torch

from ascend_kernels import device as dev


def test_grid_is_capped_near_twice_the_cores():
    cores = dev.core_count("cpu")
    assert dev.grid_size("cpu", 10**6) == dev.PROGRAMS_PER_CORE * cores
    assert dev.grid_size("cpu", 3) == min(3, dev.PROGRAMS_PER_CORE * cores)
    assert dev.grid_size("cpu", 0) == 1


def test_gpu_core_count_is_the_sm_count():
    if torch.cuda.is_available():
        assert dev.core_count("cuda") == torch.cuda.get_device_properties(0).multi_processor_count


def test_tiles():
    assert dev.channel_tile(8192) == 512 and dev.channel_tile(300) == 256  # NPU sizing
    assert dev.channel_tile(8192, "cuda") == 256
    assert dev.tile_budget_bytes("npu") == 32 * 1024
    assert [dev.pow2_ceil(n) for n in (1, 5, 64, 65)] == [1, 8, 64, 128]
    assert [dev.pow2_floor(n) for n in (1, 5, 64, 65)] == [1, 4, 64, 64]
