"""MoE routing traces: on-disk format, reader/writer, importers and generators."""
from traces.errors import TraceError, UserError
from traces.format import FORMAT_VERSION, Provenance, Trace, TraceWriter, load_trace
from traces.model_spec import ModelSpec

__all__ = [
    "FORMAT_VERSION",
    "ModelSpec",
    "Provenance",
    "Trace",
    "TraceError",
    "TraceWriter",
    "UserError",
    "load_trace",
]
