"""How expert weights are stored, and so how many bytes an expert copy moves.

A format is named by a short string (bf16, fp8, int4, mxfp4); a model profile names its default
(`expert_format`, bf16 unless the model ships quantised) and `model.expert_format=NAME` picks
another. Bytes are the stored form: weights at the format's bits per weight, rounded up to whole
bytes, plus the experts' biases kept in bf16 (gpt-oss stores them so). What dequantising a format
costs is the hardware profile's business (sim.profiles: `dequant_s_per_token`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from traces.errors import UserError

BIAS_BYTES = 2  # biases stay bf16 in every format


@dataclass(frozen=True)
class ExpertFormat:
    name: str
    bits_per_weight: float
    layout: str  # what the bits are made of, for reports and the interface note

    def weight_bytes(self, weights: int) -> int:
        return math.ceil(weights * self.bits_per_weight / 8)


FORMATS = {f.name: f for f in (
    ExpertFormat("bf16", 16.0, "2 bytes a weight"),
    ExpertFormat("fp8", 8.0, "1 byte a weight (e4m3, one scale per tensor: negligible)"),
    ExpertFormat("int4", 4.125, "4 bits a weight + one bf16 scale per group of 128 (GPTQ/AWQ-style)"),
    ExpertFormat("mxfp4", 4.25, "4 bits a weight + one 8-bit E8M0 scale per block of 32 (OCP MX, gpt-oss as shipped)"),
)}


def expert_format(name: str) -> ExpertFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(f"unknown expert format '{name}'; known formats: {', '.join(FORMATS)}") from None
