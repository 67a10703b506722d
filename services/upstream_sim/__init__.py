"""The simulated upstream: an OpenAI-compatible model server with deterministic replies and
real ``usage``, streaming, tool calls, the Batch API, and switches for latency and failures."""
