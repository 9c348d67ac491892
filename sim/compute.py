"""Compute times of one model on one hardware profile, memoised by token count (the hot path),
and how warm each GPU is after waiting, where the profile models it (sim.profiles.AfterWaitSpec);
the host CPU's expert times and the activations' trips over the host link (sim.host_cpu)."""
from __future__ import annotations

from sim.host_cpu import activation_time
from sim.profiles import HardwareProfile
from traces import ModelSpec


class ComputeModel:
    def __init__(self, hardware: HardwareProfile, model: ModelSpec):
        self.hardware = hardware
        self.model = model
        self.after_wait = hardware.after_wait
        self._expert: dict[int, float] = {}
        self._cpu_expert: dict[tuple[int, bool], float] = {}
        self._non_expert: dict[int, float] = {}
        self._warmth: dict[int, float] = {}  # per GPU, 0 cold .. 1 warm; a run starts cold (loading idles it)
        self._busy_until: dict[int, float] = {}  # per GPU: when the compute started last ends
        self._held_until: dict[int, float] = {}  # per GPU: expert compute waits for the cache's slides

    def expert_time(self, tokens: int) -> float:
        seconds = self._expert.get(tokens)
        if seconds is None:
            seconds = self._expert[tokens] = self.hardware.expert_time(self.model, tokens)
        return seconds

    def cpu_expert_time(self, tokens: int, spinning: bool = False) -> float:
        """One expert's FFN over `tokens` tokens on the host CPU (the profile's cpu section);
        `spinning`: while the host thread spins on copies (sim.host_cpu)."""
        seconds = self._cpu_expert.get((tokens, spinning))
        if seconds is None:
            model = self.model  # weights held in host RAM in the stored format, dequantised on the CPU
            seconds = self._cpu_expert[tokens, spinning] = self.hardware.cpu.expert_time(
                model, tokens, model.expert_format, model.bytes_per_expert, spinning)
        return seconds

    def activation_time(self, tokens: int) -> tuple[float, float]:
        """(down, up): `tokens` hidden states GPU -> host, and their expert outputs host -> GPU."""
        return activation_time(self.hardware.cpu, self.hardware.host_link,
                               tokens * self.model.hidden_size * self.model.bytes_per_param)

    def non_expert_time(self, tokens: int) -> float:
        seconds = self._non_expert.get(tokens)
        if seconds is None:
            seconds = self._non_expert[tokens] = self.hardware.non_expert_time(self.model, tokens)
        return seconds

    def run(self, gpu: int, now: float, seconds: float, reads_experts: bool = False) -> float:
        """How long `seconds` of work (warm, as the tables give it) takes on a GPU from `now`; work
        that reads experts first waits for blocks sliding in the cache (hold)."""
        start = max(now, self._held_until.get(gpu, 0.0)) if reads_experts else now
        spec = self.after_wait
        if spec is None:
            wall = seconds
        else:
            waited = max(0.0, start - self._busy_until.get(gpu, 0.0))
            wall, self._warmth[gpu] = spec.step(self._warmth.get(gpu, 0.0), waited, seconds)
        self._busy_until[gpu] = start + wall
        return start - now + wall

    def busy_until(self, gpu: int) -> float:
        """When the compute started last on the GPU ends."""
        return self._busy_until.get(gpu, 0.0)

    def hold(self, gpu: int, until: float) -> None:
        """Expert compute on the GPU starts no earlier than `until` (blocks slide until then)."""
        self._held_until[gpu] = max(self._held_until.get(gpu, 0.0), until)
