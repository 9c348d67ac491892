"""What realrun.calibrate needs, checked before it starts: a GPU unless the CPU is asked for, and
memory for its largest allocation (on the CPU, the "device" memory is host memory too).

The largest allocation is the all-resident run that measures the executor's per-layer host time:
every expert of OVERHEAD_LAYERS layers resident at once (Mixtral-8x7B: 8 x 8 x 352 MB = 22.5 GB),
beside the rotating weight copies of the kernel tables and the largest copy size's buffers.
"""
from __future__ import annotations

from realrun.kernels import copies_beyond_cache
from traces import ModelSpec
from traces.resources import require_gpu, require_memory

OVERHEAD_LAYERS = 8  # as realrun.calibrate
LARGEST_COPY = 512 << 20  # realrun.calibrate.COPY_SIZES[-1]
COPY_BUFFERS = 4  # two pinned sources and a cache of two slots


def device_bytes(model: ModelSpec) -> int:
    """Device memory one model's calibration holds at its peak (the all-resident overhead run)."""
    layers = min(OVERHEAD_LAYERS, model.num_layers)
    layer_weights = model.num_experts * model.bytes_per_expert + model.non_expert_params_per_layer * model.bytes_per_param
    return layers * layer_weights + copies_beyond_cache(model.bytes_per_expert) * model.bytes_per_expert


def host_bytes(model: ModelSpec) -> int:
    """Host memory besides: two pinned host sources per expert shape and the copy curve's buffers."""
    return 2 * model.bytes_per_expert + COPY_BUFFERS * LARGEST_COPY


def check_calibrate(device: str, models: list[ModelSpec], gpus: int = 1, available: int | None = None) -> None:
    """One line, before any work: no GPU where one is meant, or more memory than the machine has."""
    require_gpu("realrun.calibrate", device, "pass --device cpu to run it on the CPU anyway (tests: numbers "
                "meaningless, and models of tiny shapes only)")
    on_cpu = device == "cpu"
    largest = max(models, key=lambda m: device_bytes(m) + host_bytes(m))
    needed = host_bytes(largest) + (gpus * device_bytes(largest) if on_cpu else 0)
    require_memory(f"realrun.calibrate of {largest.name}" + (" on the CPU" if on_cpu else ""), needed,
                   "calibrate on a GPU, or give --models of smaller shapes" if on_cpu else
                   "free host memory, or give --models of smaller shapes", available)
