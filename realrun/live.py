"""python -m realrun.live --policy lru --budget 8experts [--model mixtral-8x7b] [--layers 2] [--out DIR]

Live mode: a real transformers MoE model, run end to end with its own routing. The model is built
from the model profile's shape (transformers' Mixtral, or Qwen2-MoE where the profile has shared
experts) with random weights (no hub is reachable here), over its first --layers layers; every
expert's weights go to pinned host memory, and each MoE block's experts are then served by
realrun's expert cache, copy engine and the policy, through the same executor as trace replay.
Prompts are random token ids; decoding is greedy with a KV cache.

The routing the model took is written as a trace (DIR/trace), and the simulator replays it on the
given hardware profile, so the run ends with the same table as python -m realrun.compare. Writes
metrics.json, requests.csv, layers.csv, run_config.json (the real run), compare.md.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from policies import RequestInfo, Step, make_policy
from realrun.backend import Backend
from realrun.compare import comparison_row, flat_metrics, markdown
from realrun.executor import Executor, Machine, RealOptions, collector_paused
from realrun.kernels import swiglu
from sim.api import PreparedRun, execute, prepare, resolve_hardware, run_result
from sim.budget import parse_budget
from sim.config import SimConfig
from sim.profiles import HardwareProfile
from sim.replay import RunState
from sim.report import print_run, write_run
from traces.atomic import atomic_write_text
from traces import ModelSpec, Provenance, TraceWriter, load_trace
from traces.cli import ArgumentParser, run_cli
from traces.errors import UserError
from traces.model_spec import load_model_spec

VOCAB = 1024  # random ids; a small vocabulary keeps the embedding and the LM head small


def build_model(spec: ModelSpec, backend: Backend) -> nn.Module:
    """A transformers MoE model of the profile's shape, random bf16 weights, on the backend's device."""
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                  num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
                  num_experts_per_tok=spec.top_k, max_position_embeddings=4096, tie_word_embeddings=False)
    if spec.num_shared_experts:
        config = Qwen2MoeConfig(**common, num_experts=spec.num_experts, moe_intermediate_size=spec.expert_intermediate_size,
                                shared_expert_intermediate_size=spec.shared_expert_intermediate_size
                                * spec.num_shared_experts, intermediate_size=spec.expert_intermediate_size,
                                decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False)
    else:
        config = MixtralConfig(**common, num_local_experts=spec.num_experts, intermediate_size=spec.expert_intermediate_size)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(backend.device):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE blocks in layer order: modules with a router `gate` and fused `experts`."""
    blocks = [m for m in model.modules() if hasattr(m, "gate") and hasattr(getattr(m, "experts", None), "gate_up_proj")]
    if not blocks:
        raise UserError(f"{type(model).__name__} has no MoE blocks with fused experts (transformers >= 5 layout)")
    return blocks


class RoutedRouter(nn.Module):
    """Wraps a block's router: keeps its probabilities for the policy and the recorded trace."""

    def __init__(self, router: nn.Module):
        super().__init__()
        self.router = router
        self.probs: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor):
        logits, scores, indices = self.router(hidden_states)
        self.probs = torch.softmax(logits.float(), dim=-1)
        return logits, scores, indices


class OffloadedExperts(nn.Module):
    """Replaces a block's experts: the block's routing goes to the live run, which serves the experts."""

    def __init__(self, run: LiveRun, layer: int, router: RoutedRouter):
        super().__init__()
        self.run = run
        self.layer = layer
        self.router = router

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return self.run.moe_layer(self.layer, hidden_states, self.router.probs, top_k_index, top_k_weights)


class LiveRun:
    def __init__(self, spec: ModelSpec, policy_name: str, policy_params: dict[str, Any], budget: str,
                 options: RealOptions, hardware: HardwareProfile):
        self.spec = spec
        self.machine = Machine(spec, options, non_expert=False, random_experts=False)
        self.backend = self.machine.backends[0]
        self.model = build_model(spec, self.backend)
        self.policy = make_policy(policy_name, **policy_params)
        if self.policy.reads_future:
            raise UserError(f"policy '{policy_name}' reads the trace's future; a live run has none")
        self.budget_bytes = parse_budget(budget, spec.bytes_per_expert)
        self._offload()
        self.executor = Executor(self.machine, None, self.policy, spec, hardware, self.budget_bytes, [])
        self.step: Step | None = None
        self.routing: list[tuple[np.ndarray, np.ndarray]] = []  # per layer of the running pass
        self.bypass = False

    def _offload(self) -> None:
        """Every expert's weights to its pinned host buffer ([gate|up] then down, as realrun's
        swiglu reads them); the block's experts module replaced by the offloaded one."""
        host = self.machine.host
        for layer, block in enumerate(moe_blocks(self.model)):
            experts = block.experts
            for e in range(self.spec.num_experts):
                values = host.expert(layer, e).view(torch.bfloat16)
                gate_up, down = experts.gate_up_proj[e], experts.down_proj[e]
                values[: gate_up.numel()].copy_(gate_up.reshape(-1))
                values[gate_up.numel(): gate_up.numel() + down.numel()].copy_(down.reshape(-1))
            router = RoutedRouter(block.gate)
            block.gate = router
            block.experts = OffloadedExperts(self, layer, router)
        if self.backend.is_cuda:
            torch.cuda.empty_cache()

    def moe_layer(self, layer: int, hidden: torch.Tensor, probs: torch.Tensor, index: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        if self.bypass:
            return out
        executor = self.executor
        executor.wait(self.backend.record_compute())  # the router's choice reaches the host
        probs_host, index_host = probs.cpu().numpy(), index.cpu().numpy()
        self.routing.append((probs_host, index_host))
        if len(index_host) == 1:  # decode: the token's top-k, in its order (as a trace records it)
            experts = tuple(int(e) for e in index_host[0])
        else:  # prefill: the union, as sim.schedule builds a prefill pass
            experts = tuple(int(e) for e in np.unique(index_host))
        plan = executor.layer_plan(self.step, layer, probs_host, experts)
        hidden_size = self.spec.hidden_size

        def launch(i: int, expert_weights: torch.Tensor) -> None:
            rows, slot = torch.where(index == experts[i])
            y = swiglu(hidden[rows], expert_weights, hidden_size) * weights[rows, slot, None].to(hidden.dtype)
            out.index_add_(0, rows, y)
        executor.run_experts(layer, experts, plan, launch)
        return out

    def _forward(self, ids: torch.Tensor, cache) -> torch.Tensor:
        with torch.no_grad(), self.backend.on_compute():
            logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            return logits[:, -1].argmax(dim=-1, keepdim=True)

    def warm_up(self, prompt_tokens: int) -> None:
        """Kernels and library handles once, experts bypassed (the policy sees nothing)."""
        from transformers import DynamicCache

        self.bypass = True
        ids = torch.zeros(1, prompt_tokens, dtype=torch.long, device=self.backend.device)
        cache = DynamicCache()
        self._forward(self._forward(ids, cache), cache)
        self.bypass = False
        self.executor.prepare([])
        if any(len(f) > 1 for f in self.executor.part_fractions):
            raise UserError(f"policy '{self.policy.name}' splits experts; live mode keeps them whole")
        self.backend.synchronize()

    def generate(self, prompts: list[torch.Tensor], output_tokens: int, on_request_done=None) -> tuple[RunState, list]:
        """Greedy generation of each prompt; returns the run's state and each request's routing
        (probs [iterations, layers, experts], experts [iterations, layers, k])."""
        with collector_paused():
            return self._generate(prompts, output_tokens, on_request_done)

    def _generate(self, prompts: list[torch.Tensor], output_tokens: int, on_request_done) -> tuple[RunState, list]:
        from transformers import DynamicCache

        executor = self.executor
        routings = []
        executor.start_clock()
        for r, prompt in enumerate(prompts):
            info = RequestInfo(r, f"live-{r}", len(prompt), output_tokens, None)
            timer = executor.request_started(info, executor.now())
            cache, ids, rows = DynamicCache(), prompt[None].to(self.backend.device), []
            for t in range(output_tokens):
                self.step = Step(executor.next_step, "prefill" if t == 0 else "decode", (r,),
                                 np.zeros(ids.shape[1], dtype=np.intp))
                executor.step_started(self.step)
                self.routing = []
                ids = self._forward(ids, cache)
                executor.step_ended(self.step, self.backend.record_compute())  # once the token is out
                timer.token(executor.now())
                rows.append(self.routing)
            executor.request_ended(info, timer)
            routings.append(rows)
            if on_request_done is not None:
                on_request_done(r)
        executor.drain()
        makespan = executor.now()
        self.backend.synchronize()
        return RunState(executor.recorder, list(executor.caches), makespan), [self._stack(rows) for rows in routings]

    @staticmethod
    def _stack(rows: list[list[tuple[np.ndarray, np.ndarray]]]) -> tuple[np.ndarray, np.ndarray]:
        """Per pass, per layer (probs [tokens, E], top-k [tokens, k]) -> [iterations, layers, ...]."""
        probs = np.concatenate([np.stack([p for p, _ in layers], axis=1) for layers in rows])
        experts = np.concatenate([np.stack([k for _, k in layers], axis=1) for layers in rows])
        return probs, experts


def write_trace(spec: ModelSpec, routings: list, prompt_tokens: int, output_tokens: int, out_dir: Path,
                model_kind: str) -> Path:
    source = Provenance(model=f"random-weight transformers {model_kind} of the {spec.name} shape ({spec.num_layers} layers)",
                        weights_origin="random (realrun.live; no hub)", dataset="random prompt token ids",
                        tool="realrun.live")
    with TraceWriter(out_dir, spec, source, overwrite=True) as writer:
        for r, (probs, experts) in enumerate(routings):
            writer.add_request(request_id=f"live-{r}", dataset="live", probs=probs, experts=experts,
                               prefill_iters=prompt_tokens, prompt_tokens=prompt_tokens, output_tokens=output_tokens)
    return out_dir


def run_live(spec: ModelSpec, policy: str, budget: str, requests: int, prompt_tokens: int, output_tokens: int,
             hardware: str | dict, options: RealOptions, out: Path, policy_params: dict | None = None):
    """A live run and the simulator's replay of its routing: (real RunResult, simulated RunResult)."""
    if prompt_tokens < 1 or output_tokens < 1 or requests < 1:
        raise UserError("requests, prompt tokens and output tokens must be at least 1")
    live = LiveRun(spec, policy, policy_params or {}, budget, options, resolve_hardware(hardware))
    live.warm_up(prompt_tokens)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (prompt_tokens,), generator=generator) for _ in range(requests)]
    started = time.perf_counter()
    with tqdm(total=requests, desc=f"live {policy} {budget}", unit="req", leave=False) as bar:
        state, routings = live.generate(prompts, output_tokens, lambda _r: bar.update())
    wall = time.perf_counter() - started
    kind = "Qwen2-MoE" if spec.num_shared_experts else "Mixtral"
    trace = load_trace(write_trace(spec, routings, prompt_tokens, output_tokens, out / "trace", kind))
    cfg = SimConfig(trace=str(trace.path), policy=policy, policy_params=policy_params or {}, budget=budget,
                    hardware=hardware)
    sim_run = prepare(cfg, trace)
    real = run_result(PreparedRun(cfg, trace, spec, sim_run.hardware, live.budget_bytes, live.policy, [],
                                  list(range(requests))), state, wall, hardware_name=f"real: {live.machine.device_name}",
                      extra_info={"compute_estimated": [],
                                  "realrun": [*live.machine.notes(), f"live {kind} model, {spec.num_layers} layers"]})
    write_run(real, out)
    sim = execute(sim_run)
    row = comparison_row(flat_metrics(sim, "sim", budget), flat_metrics(real, "real", budget))
    title = f"# Live {kind} run ({live.machine.device_name}) against the simulator replaying its routing"
    atomic_write_text(out / "compare.md", markdown(pd.DataFrame([row]), [title]) + "\n")
    return real, sim


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m realrun.live", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="lru")
    parser.add_argument("--budget", default="8experts")
    parser.add_argument("--model", default="mixtral-8x7b", help="model profile (conf/model) whose shape is built")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers built (memory, time)")
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--hardware", default="h100", help="profile the simulator replays the recorded routing on")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="outputs/live")
    args = parser.parse_args(argv)

    def work() -> None:
        full = load_model_spec(args.model)
        if not 1 <= args.layers <= full.num_layers:
            raise UserError(f"--layers {args.layers}: {full.name} has {full.num_layers} layers")
        out = Path(args.out)
        real, _ = run_live(dataclasses.replace(full, num_layers=args.layers), args.policy, args.budget, args.requests,
                           args.prompt_tokens, args.output_tokens, args.hardware, RealOptions(device=args.device), out)
        print_run(real)
        print((out / "compare.md").read_text())
        print(f"results: {out}")
    run_cli(work)


if __name__ == "__main__":
    main()
