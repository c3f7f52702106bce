"""Stand-in for vLLM's parallel state: tests set the rank this process plays."""

TP_RANK = 0
TP_SIZE = 1


def get_tensor_model_parallel_rank() -> int:
    return TP_RANK


def get_tensor_model_parallel_world_size() -> int:
    return TP_SIZE
