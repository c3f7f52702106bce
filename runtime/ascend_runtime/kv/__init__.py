"""KV-cache transfer: cross-layer layout, host offload, and prefill->decode transfer.

`layout` describes where each (block, layer, token, head) of a rank's cache lives, `rank_map`
decides which prefill ranks' bytes each decode rank pulls, `transfer` moves them (TCP built in,
Mooncake when installed) and tracks completion, and `offload` keeps blocks in a host pool.
Torch is imported only by the parts that allocate tensors, so the sim engine runs without it.
"""
