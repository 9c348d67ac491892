#!/bin/bash
# Session 14, device call 1: the clock probe, calibrate, compare with timelines (all but deepspeed), CUDA tests.
set -o pipefail
export TQDM_MININTERVAL=30 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
{
echo "== machine"; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv; nproc; lscpu | grep "Model name"
date +%T; echo "== clock probe"
timeout 90 python3 -m realrun.clock_probe --out /tmp/probe
date +%T; echo "== calibrate"
timeout 150 python3 -m realrun.calibrate --out $OUT/profile.yaml
date +%T; echo "== compare"
timeout 270 python3 -m realrun.compare --trace mixtral-8x7b-gsm8k --layers 16 --train-fraction 0.5 --policies lru,belady,all_resident,finemoe,oracle_prefetch,mixtral_offload,moepic,promoe,moe_infinity --hardware $OUT/profile.yaml --timeline --out /tmp/cmp
date +%T; echo "== cuda tests"
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_realrun.py -k cuda -rfE 2>&1 | tail -15
date +%T
} 2>&1 | tee $OUT/log.txt
tar czf $OUT/probe.tgz -C /tmp probe; tar czf $OUT/cmp.tgz -C /tmp --exclude 'cmp/trace-*' cmp; ls -la $OUT
