#!/bin/bash
# Session 15, device call 5 (the same warm H100 as call 4, its /tmp/prof.yaml): moe_infinity and oracle_prefetch at
# 96 experts again, with --timeline (every kernel group's host launch and GPU times, every wait).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site TQDM_DISABLE=1; ls /tmp/prof.yaml && timeout 150 python3 -m realrun.compare --trace mixtral-8x7b-gsm8k --train-fraction 0.5 --graphs --layers 16 --hardware /tmp/prof.yaml --policies moe_infinity,oracle_prefetch --budgets 96experts --timeline --out /tmp/tl 2>&1 | grep "^|"; tar czf $OUT/tl.tgz -C /tmp --exclude "tl/trace-*" tl; ls -la $OUT
