#!/bin/bash
# Session 14, device call 3: the wait-mode probe; calibrate and compare 9 policies with the executor sleeping on copies.
set -o pipefail
export TQDM_MININTERVAL=60 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
CMP="python3 -m realrun.compare --trace mixtral-8x7b-gsm8k --layers 16 --train-fraction 0.5"
{
date +%T; echo "== probe"
timeout 60 python3 -m realrun.clock_probe --out /tmp/probe
date +%T; echo "== calibrate (sleep)"
timeout 90 python3 -m realrun.calibrate --copy-wait sleep --out /tmp/prof-sleep.yaml && cp /tmp/prof-sleep.yaml $OUT/profile-sleep.yaml
date +%T; echo "== compare (sleep)"
timeout 330 $CMP --copy-wait sleep --hardware /tmp/prof-sleep.yaml --policies all_resident,lru,belady,finemoe,oracle_prefetch,mixtral_offload,moepic,promoe,moe_infinity --out /tmp/cmps | tail -30
date +%T
} 2>&1 | grep -v "it/s\]\|s/run\]\|req/s\]" | tee $OUT/log.txt
tar czf $OUT/probe.tgz -C /tmp probe; tar czf $OUT/cmps.tgz -C /tmp --exclude 'cmps/trace-*' cmps; ls -la $OUT
