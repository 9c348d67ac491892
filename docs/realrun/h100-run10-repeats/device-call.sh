#!/bin/bash
# Session 14, device call 4: calibrate; 5 policies at 2 budgets measured 3 times each (the noise); deepspeed on 8 layers.
set -o pipefail
export TQDM_MININTERVAL=60 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
CMP="python3 -m realrun.compare --trace mixtral-8x7b-gsm8k --train-fraction 0.5 --hardware /tmp/prof.yaml"
{
date +%T; echo "== calibrate"
timeout 90 python3 -m realrun.calibrate --out /tmp/prof.yaml && cp /tmp/prof.yaml $OUT/profile.yaml
date +%T; echo "== compare x3"
timeout 330 $CMP --layers 16 --repeats 3 --budgets 32experts,96experts --policies all_resident,lru,mixtral_offload,belady,oracle_prefetch --out /tmp/rep | tail -14
date +%T; echo "== deepspeed, 8 layers"
timeout 130 $CMP --layers 8 --policies deepspeed --out /tmp/ds | tail -6
date +%T
} 2>&1 | grep -v "it/s\]\|s/run\]\|req/s\]" | tee $OUT/log.txt
tar czf $OUT/rep.tgz -C /tmp --exclude 'rep/trace-*' rep; tar czf $OUT/ds.tgz -C /tmp --exclude 'ds/trace-*' ds; ls -la $OUT
