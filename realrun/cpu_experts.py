"""Experts computed for real on the host CPU (torch on the CPU), for policies that answer
PrefetchPlan.cpu, and the measurement of the CPU's expert-FFN table (sim.host_cpu) that
realrun.calibrate writes into a hardware profile's cpu section (`python -m realrun.cpu_experts`
measures it alone and writes it into a copy of a profile).

The hidden state of the tokens a CPU expert serves is copied into a pinned host buffer, the FFN
runs on the host's threads over the expert's weights in host memory (the same SwiGLU layout as
realrun.kernels), and the result comes back through a pinned buffer with a non-blocking copy.
Experts with biases (gpt-oss) use gpt-oss's clamped SwiGLU with biases. MXFP4 experts (gpt-oss as
shipped) are dequantised on the CPU (a 16-entry lookup of the 4-bit codes times each block of
32's power-of-two scale, into bf16) and then computed in bf16: what a torch-on-CPU backend does;
llama.cpp's fused MXFP4 dot kernels skip the bf16 copy and would be faster.
The executor's host thread spins on copy events, so the FFN gets one core fewer than the host has
(`ffn_threads()`), and the table is measured with the same count.

That spinning thread holds the GIL, and the worker thread running the FFN needs it back after every
torch call (the kernels release it): at Python's default switch interval (5 ms) each hand-over waits
up to 5 ms, and one bf16 Mixtral expert took ~290 ms beside the spinning thread against 6.5 ms alone
(H200 host). So CpuLayer sets the interval to SWITCH_INTERVAL_S while it is open. Even so the FFN
runs slower beside the spinning thread (12.7 ms) than while the host thread blocks on its result
(6.8 ms), and the executor does both: it spins while the layer's GPU side waits for copies, then
blocks. `--as-run` measures both tables the way the run computes, on CpuLayer's worker thread
(`cpu_table(..., host=...)`): the profile's expert_time_s with the measuring thread blocked,
spinning_time_s with it spinning in Python (sim.host_cpu charges each where the run is in that state).
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from realrun.kernels import GPT_OSS, clamped_swiglu, swiglu
from traces.errors import UserError
from traces import ModelSpec

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "mxfp4": torch.bfloat16}  # mxfp4 computes in bf16
MX_BLOCK = 32
# The GIL's hand-over interval while CPU experts run beside the executor's spinning host thread
# (Python's default, 5 ms, starved the FFN's worker thread 45-fold; see the module's docstring).
SWITCH_INTERVAL_S = 1e-4
# The 16 FP4 (E2M1) values, indexed by their 4-bit code.
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_BYTE = torch.arange(256)
_BYTE_VALUES = torch.stack([FP4_VALUES[_BYTE & 0x0F], FP4_VALUES[_BYTE >> 4]], dim=-1).to(torch.bfloat16)  # [256, 2]


def ffn_threads() -> int:
    """The FFN's threads: every core but the one the executor's host thread spins on."""
    return max(1, (os.cpu_count() or 1) - 1)


def dequantise_mxfp4(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Packed MXFP4 (two 4-bit codes a byte, low nibble first; one E8M0 scale byte per block of 32)
    to bf16, flat: one lookup per byte (both its values), then each block times its scale."""
    pairs = _BYTE_VALUES[codes.long()].view(-1, MX_BLOCK)
    return (pairs * torch.exp2(scales.view(-1, 1).float() - 127.0).to(torch.bfloat16)).view(-1)


def gpt_oss_swiglu(x: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor, hidden: int) -> torch.Tensor:
    """gpt-oss's expert with its biases stored after all weights (flat: gate_up [2f, h], down [h, f];
    biases [2f] then [h]), as the CPU blocks hold them."""
    width = weights.numel() // (3 * hidden)
    return clamped_swiglu(x, weights[: 2 * width * hidden].view(2 * width, hidden), biases[: 2 * width],
                          weights[2 * width * hidden:].view(hidden, width), biases[2 * width:],
                          GPT_OSS.swiglu_alpha, GPT_OSS.swiglu_limit)


class CpuExperts:
    """One model's expert FFN on the host CPU, with pinned activation buffers. An expert is the
    bytes of its host block: weights (flat: gate/up [2f, h], then down [h, f]) in the format, then
    its biases (2f + h) where the model has them, in the compute type; MXFP4: the packed codes,
    then one scale byte per 32 weights, then bf16 biases."""

    def __init__(self, model: ModelSpec, max_tokens: int, fmt: str = "bf16", threads: int | None = None,
                 pin: bool | None = None):
        if fmt not in DTYPES:
            raise ValueError(f"CPU expert format '{fmt}': use one of {', '.join(DTYPES)}")
        if threads:
            torch.set_num_threads(threads)
        self.model, self.fmt, self.dtype = model, fmt, DTYPES[fmt]
        self.weights_n = 3 * model.hidden_size * model.expert_intermediate_size
        self.biases_n = (2 * model.expert_intermediate_size + model.hidden_size) if model.expert_bias else 0
        pin = torch.cuda.is_available() if pin is None else pin
        shape = (max_tokens, model.hidden_size)
        self.down = torch.empty(shape, dtype=self.dtype, pin_memory=pin)  # hidden state, GPU -> host
        self.up = torch.empty(shape, dtype=self.dtype, pin_memory=pin)  # results, host -> GPU

    def weights(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random bytes of one expert in this format (see the class)."""
        values = torch.randn(self.weights_n + self.biases_n, generator=generator) * 0.02
        if self.fmt != "mxfp4":
            return values.to(self.dtype).view(torch.uint8)
        codes = torch.randint(0, 256, (self.weights_n // 2,), generator=generator, dtype=torch.uint8)
        scales = torch.full((self.weights_n // MX_BLOCK,), 127 - 6, dtype=torch.uint8)  # 2^-6: weights ~0.02
        return torch.cat([codes, scales, values[self.weights_n:].to(torch.bfloat16).view(torch.uint8)])

    def ffn(self, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """One expert over x [tokens, hidden], its weights the bytes `block` (uint8)."""
        h = self.model.hidden_size
        if self.fmt == "mxfp4":
            n = self.weights_n
            weights = dequantise_mxfp4(block[: n // 2], block[n // 2: n // 2 + n // MX_BLOCK])
            rest = block[n // 2 + n // MX_BLOCK:]
            biases = rest[: rest.numel() // 2 * 2].view(torch.bfloat16)
        else:
            values = block[: block.numel() // self.dtype.itemsize * self.dtype.itemsize].view(self.dtype)
            weights, biases = values[: self.weights_n], values[self.weights_n: self.weights_n + self.biases_n]
        if self.biases_n:
            return gpt_oss_swiglu(x, weights, biases, h)
        return swiglu(x, weights, h)

    def run(self, y: torch.Tensor, experts: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        """Sum over experts of FFN(y[:tokens]) for (block, tokens) in `experts`, computed on the
        CPU; y lives on any device. Returns the result on y's device (rows: the most tokens)."""
        rows = max(t for _, t in experts)
        down = self.down[:rows]
        down.copy_(y[:rows])
        out = self.compute(down, experts)
        return out.to(y.device, non_blocking=True)

    def compute(self, down: torch.Tensor, experts: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        out = self.up[:down.shape[0]]
        out.zero_()
        for block, tokens in experts:
            out[:tokens] += self.ffn(down[:tokens], block)
        return out


HOSTS = ("alone", "blocked", "spinning")  # cpu_table's `host`


def cpu_table(model: ModelSpec, tokens: list[int], fmt: str = "bf16", threads: int | None = None,
              repeats: int = 21, weights_copies: int = 8, host: str = "alone",
              pin: bool | None = None) -> list[list[float]]:
    """[[tokens, seconds], ...]: one expert's FFN on this host's CPU, the median of `repeats`
    (at 9, two measurements minutes apart on one H200 host differed by up to 20%) taken in rounds
    over every token count (a slow spell shifts them alike), cycling through
    `weights_copies` experts' weights (as many as realrun's host sources) so that the host's caches
    do not hold them (at real shapes each expert is far beyond the last-level cache). The weights
    and activations are pinned where CUDA is, as the run holds them (realrun.memory.HostExperts;
    `pin`: None, so; True or False to compare; on one H200 host pinning changed the table by no
    consistent sign). `host`: "alone", computed on this thread;
    "blocked" and "spinning", as the executor computes it, on CpuLayer's worker thread while this
    thread blocks on the result or spins in Python (as the executor's host thread does on copy
    events). The key for the profile is sim.host_cpu.CpuSpec.key(model, fmt)."""
    if host not in HOSTS:
        raise ValueError(f"host={host!r}: one of {', '.join(HOSTS)}")
    pin = torch.cuda.is_available() if pin is None else pin
    layer = None if host == "alone" else CpuLayer(model, max(tokens), pin=pin, fmt=fmt, threads=threads)
    cpu = layer.cpu if layer else CpuExperts(model, max(tokens), fmt, threads, pin=pin)
    run = cpu.run if layer is None else (lambda y, experts: (spin_until if host == "spinning" else Future.result)(
        layer.start(y, experts)))
    gen = torch.Generator().manual_seed(0)
    blocks = [cpu.weights(gen) for _ in range(max(1, weights_copies))]
    if pin:
        blocks = [b.pin_memory() for b in blocks]
    y = torch.randn(max(tokens), model.hidden_size, generator=gen).to(cpu.dtype)
    samples: dict[int, list[float]] = {t: [] for t in tokens}
    try:
        for t in tokens:
            for block in blocks:  # warm up this shape (the CPU kernels pick their blocking per shape)
                run(y, [(block, t)])
        for r in range(repeats):
            for t in tokens:
                start = time.perf_counter()
                run(y, [(blocks[r % len(blocks)], t)])
                samples[t].append(time.perf_counter() - start)
    finally:
        if layer:
            layer.close()
    return [[float(t), float(sorted(s)[len(s) // 2])] for t, s in samples.items()]


def spin_until(work: Future):
    """Wait for `work` as the executor's host thread waits for copies: spinning in Python, holding
    the GIL but for the interpreter's hand-overs."""
    while not work.done():
        pass
    return work.result()


def model_formats(model: ModelSpec) -> tuple[str, ...]:
    """The formats to measure: bf16 always, and the model's own where it ships quantised (MXFP4)."""
    return ("bf16",) + ((model.expert_format,) if model.expert_format in DTYPES and model.expert_format != "bf16" else ())


def cpu_section(models: list[ModelSpec], tokens: list[int], formats: tuple[str, ...] | None = None,
                threads: int | None = None, as_run: bool = False, **spec) -> dict:
    """A hardware profile's `cpu:` section with the expert tables measured on this host
    (formats: None, each model's `model_formats`; as_run: two tables, cpu_table's host "blocked" as
    expert_time_s and "spinning" as spinning_time_s, else one of host "alone"; spec: mem_bandwidth_Bps,
    matmul_flops, as known for the host). `cores` is the threads the FFN ran on."""
    cores = threads or ffn_threads()
    keys = [(m, fmt) for m in models for fmt in (formats or model_formats(m))]
    tables = {f"{m.expert_shape_key}/{fmt}": cpu_table(m, tokens, fmt, cores, host="blocked" if as_run else "alone")
              for m, fmt in keys}
    spinning = {f"{m.expert_shape_key}/{fmt}": cpu_table(m, tokens, fmt, cores, host="spinning")
                for m, fmt in keys} if as_run else {}
    how = (f"on a worker thread beside the host thread, blocked on the result (expert_time_s) or spinning in "
           f"Python (spinning_time_s), GIL switch interval {SWITCH_INTERVAL_S * 1e3:g} ms"
           if as_run else "alone on the measuring thread")
    return {"cores": cores, "mem_bandwidth_Bps": spec.get("mem_bandwidth_Bps", 1.0e11),
            "matmul_flops": spec.get("matmul_flops", 1.0e12), "expert_time_s": tables,
            **({"spinning_time_s": spinning} if spinning else {}),
            "origin": f"realrun.cpu_experts cpu_table on this host ({how}), torch {torch.__version__}, {cores} "
                      f"threads of {os.cpu_count()} cores; mxfp4: dequantised to bf16 on the CPU, then computed"}


class CpuLayer:
    """A layer's CPU experts run on a host thread (torch's CPU kernels release the GIL) while the
    executor launches and waits for the GPU's experts; the result joins the hidden state after.
    While open, the GIL's switch interval is SWITCH_INTERVAL_S (the previous one comes back on
    close), so that the executor's spinning host thread hands the GIL to the worker promptly."""

    def __init__(self, model: ModelSpec, max_tokens: int, pin: bool, fmt: str | None = None,
                 threads: int | None = None):
        fmt = fmt or (model.expert_format if model.expert_format in DTYPES else "bf16")
        self.cpu = CpuExperts(model, max_tokens, fmt, threads or ffn_threads(), pin=pin)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.last_span: tuple[float, float] = (0.0, 0.0)  # the last compute's start and end (perf_counter)

    def start(self, y: torch.Tensor, experts: list[tuple[torch.Tensor, int]]):
        """Copy the hidden state down now (y is ready: the router has run), compute in the background."""
        rows = max(t for _, t in experts)
        down = self.cpu.down[:rows]
        down.copy_(y[:rows])
        return self._pool.submit(self._compute, down, experts)

    def _compute(self, down: torch.Tensor, experts: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        start = time.perf_counter()
        out = self.cpu.compute(down, experts)
        self.last_span = start, time.perf_counter()
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        sys.setswitchinterval(self._switch_interval)


def rescaled_to_run(cpu: dict, key: str, timeline) -> tuple[dict, str]:
    """The cpu section with its blocked table (expert_time_s[key]) scaled so that its 1-token entry is
    what a real run's CPU experts took: the median per expert of the timeline's `cpu` rows (each layer's
    FFN on its worker; decode layers, one token an expert, are nearly all of them). A table measured
    minutes before the run on the same worker missed the run by -16% to +36% on H200 hosts (Mixtral);
    the spinning table is left as measured (a run that copies nothing never spins beside its FFN).
    Also returns a line saying what changed."""
    rows = timeline[timeline["kind"] == "cpu"]
    if rows.empty:
        raise UserError("the timeline has no CPU expert (kind cpu): rescale from a run of a policy that computes "
                        "on the CPU (e.g. n_cpu_moe) with --timeline")
    per_expert = float(((rows["host_end_s"] - rows["host_s"]) / rows["expert"]).median())
    table = cpu["expert_time_s"][key]
    ratio = per_expert / table[0][1]
    scaled = {**cpu, "expert_time_s": {**cpu["expert_time_s"], key: [[t, v * ratio] for t, v in table]},
              "origin": f"{cpu.get('origin', '')}; {key} expert_time_s scaled by {ratio:.3f} to a real run's "
                        f"{per_expert * 1e3:.2f} ms a CPU expert (median of {len(rows)} layers)"}
    return scaled, (f"{key}: the run took {per_expert * 1e3:.2f} ms a CPU expert against the table's "
                    f"{table[0][1] * 1e3:.2f} ms at {table[0][0]:g} token: expert_time_s scaled by {ratio:.3f}")


def cpu_policy_host_times(profile: dict, trace_name: str, layers: int | None, train_fraction: float,
                          max_requests: int | None) -> dict:
    """policy_host_s entries of the policies that compute on the CPU, measured on this host as
    calibrate measures the others (realrun.policy_host), on the profile that now has a cpu section:
    calibrate cannot, having none."""
    import tempfile
    from pathlib import Path

    from policies import policy_class, shipped
    from realrun.policy_host import policy_host_times
    from realrun.subset import first_layers
    from sim.profiles import HardwareProfile
    from traces import load_trace
    from traces.defaults import resolve_trace
    names = [p for p in shipped() if policy_class(p).uses_cpu]
    with tempfile.TemporaryDirectory() as scratch:
        trace = load_trace(resolve_trace(trace_name))
        if layers is not None:
            trace = first_layers(trace, layers, Path(scratch) / "trace")
        # Replayed uncharged, as calibrate replays (a profile's times for other policies would make the
        # simulator refuse these, which it has none for yet).
        uncharged = HardwareProfile.from_dict({k: v for k, v in profile.items() if k != "policy_host_s"})
        charged, _ = policy_host_times(trace, uncharged, train_fraction, names, max_requests=max_requests)
    return {name: t.to_dict() for name, t in charged.items()}


def main(argv: list[str] | None = None) -> None:
    """Measure the CPU tables of the given models here and write `--profile` with that cpu section
    (with --policy-trace, also the host times of the policies that compute on the CPU)."""
    from pathlib import Path

    import yaml

    from sim.profiles import load_hardware
    from traces.atomic import atomic_write_text
    from traces.cli import ArgumentParser, run_cli
    from traces.model_spec import load_model_spec
    parser = ArgumentParser(prog="python -m realrun.cpu_experts", description=main.__doc__)
    parser.add_argument("--profile", required=True, help="hardware profile to copy (name or YAML path)")
    parser.add_argument("--models", default="mixtral-8x7b,gpt-oss-20b", help="comma-separated model profiles")
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--out", required=True, help="YAML path of the profile written")
    parser.add_argument("--as-run", action="store_true",
                        help="measure as the executor computes: on a worker thread beside the host thread, "
                             "blocked on the result and spinning (two tables)")
    parser.add_argument("--policy-trace", default=None,
                        help="also measure the CPU policies' host times replaying this trace (as calibrate's --policy-trace)")
    parser.add_argument("--policy-layers", type=int, default=None, help="its first N layers (as compare --layers)")
    parser.add_argument("--train-fraction", type=float, default=0.0, help="its leading share that trains the policies")
    parser.add_argument("--max-requests", type=int, default=None, help="replay only the first N requests after training")
    parser.add_argument("--rescale-from", default=None,
                        help="measure nothing: scale --profile's blocked table of each of --models to the CPU experts of "
                             "a compare run with --timeline (its directory: timeline.csv)")

    def rescale() -> None:
        import pandas as pd
        profile = load_hardware(args.profile).to_dict()
        path = Path(args.rescale_from) / "timeline.csv"
        if not path.is_file():
            raise UserError(f"--rescale-from {args.rescale_from}: no timeline.csv there; give the --out directory of "
                            "a realrun.compare run with --timeline")
        timeline = pd.read_csv(path)
        for name in (n for n in args.models.split(",") if n):
            model = load_model_spec(name)
            key = f"{model.expert_shape_key}/bf16"  # realrun computes its experts in bf16
            if key not in ((profile.get("cpu") or {}).get("expert_time_s") or {}):
                raise UserError(f"--profile has no CPU table {key} to rescale; measure it first (--as-run)")
            profile["cpu"], note = rescaled_to_run(profile["cpu"], key, timeline)
            print(note)
        atomic_write_text(Path(args.out), yaml.safe_dump(profile, sort_keys=False, width=200))

    def work() -> None:
        if args.rescale_from:
            return rescale()
        profile = load_hardware(args.profile).to_dict()
        section = cpu_section([load_model_spec(n) for n in args.models.split(",") if n],
                              [int(t) for t in args.tokens.split(",")], as_run=args.as_run)
        kept = (profile.get("cpu") or {})
        profile["cpu"] = {**section, **{k: kept[k] for k in ("mem_bandwidth_Bps", "matmul_flops", "down_link",
                                                             "dequant_s_per_byte") if k in kept}}
        if args.policy_trace:
            times = cpu_policy_host_times(profile, args.policy_trace, args.policy_layers, args.train_fraction,
                                          args.max_requests)
            profile["policy_host_s"] = {**(profile.get("policy_host_s") or {}), **times}
            print("policy host time per layer / per pass (us), measured here: " + ", ".join(
                f"{n} {t['layer_s'] * 1e6:.1f} / {t['step_s'] * 1e6:.1f}" for n, t in times.items()))
        atomic_write_text(Path(args.out), yaml.safe_dump(profile, sort_keys=False, width=200))
        print(yaml.safe_dump({"cpu": profile["cpu"]}, sort_keys=False, width=200))
    args = parser.parse_args(argv)
    run_cli(work)


if __name__ == "__main__":
    main()
