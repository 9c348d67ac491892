"""Collect routing traces from real transformers MoE models over ShareGPT, LMSYS or any prompt file.

    python -m traces.collect PATH_OR_HUB_ID --dataset sharegpt --n-requests 100 [--out DIR --FLAG VALUE ...]

Modules: config (the settings), prompts (sources, chat templates, length filters, seeded sampling),
routers (hooks on the router modules), runner (batched prefill and decode), embeddings (MiniLM),
collector (shards, resume, merge), tiny (small random-weight models for tests and pipeline checks).
"""
