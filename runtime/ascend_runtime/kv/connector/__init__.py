"""ascend-serve's KV connector for vLLM, engine-independent: `settings` (what an instance is),
`scheduler` (what moves each step), `caches` (the engine's tensors and their host stage),
`worker` (one rank's serving and pulling). `ascend_runtime.kv.vllm_connector` binds it to
vLLM's KVConnectorBase_V1."""
