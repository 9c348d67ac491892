"""Stop-gap until the gpt-oss importer (issue 18, traces.convert) is merged: the real gpt-oss-20b routing of
../shared/data/routing/gpt-oss-20b as a trace (every STEP-th request; top-4 ids and weights, the other 28
probabilities stored as 0, i.e. not recorded; no prompt embeddings), the model given inline: 24 layers, 32 experts,
top-4, hidden 2880, experts in MXFP4 at 13,219,200 bytes (hardware.md). Used for docs/reproduce; delete once
the importer's shipped trace replaces it.

    PYTHONPATH=. python docs/reproduce/scratch_gptoss_trace.py OUT_DIR [STEP=5]
"""
import json, sys
import numpy as np
from traces import Provenance, TraceWriter
from traces.model_spec import ModelSpec
step = int(sys.argv[2]) if len(sys.argv) > 2 else 5
z = np.load('/work/shared/data/routing/gpt-oss-20b/routing.npz')
reqs = [json.loads(l) for l in open('/work/shared/data/routing/gpt-oss-20b/requests.jsonl')]
m = ModelSpec(name="gpt-oss-20b", num_layers=24, num_experts=32, top_k=4, hidden_size=2880, expert_intermediate_size=2880,
              num_attention_heads=64, num_key_value_heads=8, bytes_per_expert_override=13_219_200)
src = Provenance(model="openai/gpt-oss-20b", weights_origin="hub (MXFP4)", dataset="mixed benchmarks", tool="scratch h20")
off = z['offsets']
with TraceWriter(sys.argv[1], m, src, topm=4, overwrite=True) as w:
    for r in reqs[::step]:
        i = r['request']
        a, b = off[i], off[i + 1]
        ex = z['experts'][a:b].astype(np.int64); pr = z['probs'][a:b].astype(np.float32)
        probs = np.zeros((b - a, 24, 32), np.float32)
        np.put_along_axis(probs, ex, pr, axis=-1)
        w.add_request(request_id=str(i), dataset=r['category'], probs=probs, prompt=r['prompt'],
                      prompt_tokens=r['prompt_tokens'], experts=ex.astype(np.uint16))
