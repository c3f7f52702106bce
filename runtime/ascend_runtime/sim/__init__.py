"""The NPU-mocked engine: vLLM's OpenAI API, metrics and PD protocol without an NPU."""
