#!/bin/bash
# Session 14, device call 2: calibrate (with the after-wait response), a timeline A/B, the comparison of 9 policies.
set -o pipefail
export TQDM_MININTERVAL=60 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
CMP="python3 -m realrun.compare --trace mixtral-8x7b-gsm8k --layers 16 --train-fraction 0.5 --hardware /tmp/prof.yaml"
{
echo "== machine"; nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv; lscpu | grep "Model name"
date +%T; echo "== calibrate"
timeout 120 python3 -m realrun.calibrate --out /tmp/prof.yaml && cp /tmp/prof.yaml $OUT/profile.yaml
date +%T; echo "== timeline A/B"
timeout 60 $CMP --policies all_resident,lru --budgets 32experts --timeline --out /tmp/ab | tail -5
date +%T; echo "== compare"
timeout 370 $CMP --policies all_resident,lru,belady,finemoe,oracle_prefetch,mixtral_offload,moepic,promoe,moe_infinity --out /tmp/cmp | tail -32
date +%T
} 2>&1 | grep -v "it/s\]\|s/run\]\|req/s\]" | tee $OUT/log.txt
tar czf $OUT/ab.tgz -C /tmp --exclude 'ab/trace-*' ab; tar czf $OUT/cmp.tgz -C /tmp --exclude 'cmp/trace-*' cmp; ls -la $OUT
