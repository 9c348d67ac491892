#!/bin/bash
# Session 16, device call 4 (nvidia-h200): calibrate (copy curve in rounds; slides modelled), copy probe, every policy twice.
set -o pipefail
export TQDM_MININTERVAL=60 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
CMP="python3 -m realrun.compare --trace mixtral-8x7b-gsm8k --train-fraction 0.5 --graphs --hardware /tmp/prof.yaml --layers 16 --budgets 32experts,64experts,96experts"
POL=all_resident,lru,belady,mixtral_offload,finemoe,moe_infinity,moepic,promoe,oracle_prefetch
{
date +%T; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv; echo "== calibrate --graphs"
timeout 150 python3 -m realrun.calibrate --graphs --policy-trace mixtral-8x7b-gsm8k --policy-layers 16 --train-fraction 0.5 --out /tmp/prof.yaml && cp /tmp/prof.yaml $OUT/profile.yaml
timeout 30 python3 .devaux/copy_probe.py "after calibrate"
date +%T
timeout 470 $CMP --policies $POL --repeats 2 --out /tmp/a | tail -30
timeout 30 python3 .devaux/copy_probe.py "after the runs"
date +%T
} 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/run\]\|req/s\]\|run/s\]\|size/s\]\|shape/s\]\|model/s\]\|policy/s\]\|^\s*$\|\[A$" | tee $OUT/log.txt
for d in a; do [ -d /tmp/$d ] && tar czf $OUT/$d.tgz -C /tmp --exclude "$d/trace-*" $d; done; ls -la $OUT
