"""Rollouts: one engine interface, two real backends speaking SGLang's native HTTP API.

    engine.py          the RolloutEngine protocol (generate / sync_weights / weight_version / close)
    http_engine.py     HttpEngine: the protocol over SGLang-API servers (in-flight requests, timeouts,
                       failover or a clear error, pause/flush/continue around syncs, memory release)
    sglang_launcher.py start `python -m sglang.launch_server`, sglang-router or the embedded server;
                       wait for /health ("auto" = SGLang when installed, else the embedded server)
    server.py          popo-rollout-server: the embedded SGLang-API server on a transformers model
    generation.py      its batched KV-cache sampling with SGLang's log-prob convention
    sglang_api.py      the request/response bodies (validated against SGLang's schema in tests)
    weight_sync.py     trainer side: buckets -> /update_weights_from_distributed, disk fallback, checks
    weight_group.py    the trainer<->servers broadcast group (own TCPStore; gloo or NCCL)
    tiny_model.py      a tiny random Qwen2 for tests, benchmarks and smoke runs
"""
