"""Stand-in MoE models at the paper's routing shapes, trained here because no hub weights can be had.

    python -m traces.standin.corpus OUT_DIR            # tokenizer, packed training tokens, held-out prompts
    python -m traces.standin.train mixtral-8x7b CORPUS_DIR OUT_DIR [--steps ... --lr ...]

The models keep Mixtral-8x7B's, Qwen1.5-MoE's and Phi-3.5-MoE's routing topology exactly (layers,
experts, top-k, shared expert) at a narrow hidden width; traces.collect then records their routing.
"""
