"""python -m traces.collect PATH_OR_HUB_ID [--dataset sharegpt --n-requests 100 --out DIR --FLAG VALUE ...]

Runs a transformers MoE causal LM over prompts and records its routing into a trace directory:
every prompt token's and every decode step's router probabilities and chosen experts for every
MoE layer, lookahead router outputs, prompt embeddings, token counts, timing and provenance.
An interrupted run leaves its finished batches in OUT.work/; the same command continues it.

Arguments (defaults in traces/collect/config.py; a key below is the flag --key, dashes for underscores):
  MODEL              transformers model directory or hub id (required)
  dataset            sharegpt | sharegpt-sample | lmsys | lmsys-chat | lmsys-eval | arena-hard | FILE
                     (.json, .jsonl or .parquet: prompts, conversations or [prompt, in, out] rows)
  n_requests, seed   how many prompts, drawn in seeded shuffled order among those passing the filters
  turns              first (first user turn) | all (the conversation up to its last user turn)
  min_prompt_tokens, max_prompt_tokens      prompt length filter, in the model's tokens
  max_output_tokens  cap on the recorded answer's length (and the length where none is recorded)
  output_tokens      one output length for every request
  ignore_eos, temperature                   decoding (default: the full length, greedy)
  batch_size, device, dtype                 auto: cuda and bfloat16 when a GPU is present
  lookahead, hidden_proj_dim, topm          what else to record
  embeddings         comma-separated: minilm, token_mean (the first is the default)
  weights_origin     override the recorded origin of the weights
  out, overwrite, progress
"""
from __future__ import annotations


from traces.cli import ConfigParser, run_cli
from traces.collect.config import CollectConfig


def build_parser() -> ConfigParser[CollectConfig]:
    """The command's arguments: CollectConfig's fields (the README's command lines are checked against it)."""
    return ConfigParser(CollectConfig, "python -m traces.collect", __doc__)


def main(argv: list[str] | None = None) -> None:
    def work() -> None:
        cfg = build_parser().parse_config(argv)
        from traces.collect.collector import collect
        from traces.format import load_trace

        trace = load_trace(collect(cfg))
        timing = trace.meta.extra["timing"]
        prefill = int(trace.prefill_iters.sum())
        print(f"wrote {trace.path}: {trace.num_requests} requests, {trace.num_iterations} iterations "
              f"({prefill} prefill, {trace.num_iterations - prefill} decode) on {', '.join(timing['devices'])}, "
              f"prefill {timing['prefill_tokens_per_s'] or 0:.0f} tok/s, decode {timing['decode_tokens_per_s'] or 0:.0f} tok/s")

    run_cli(work)


if __name__ == "__main__":
    main()
