"""The rewrite's settings: one frozen object, built once where a user's options come in (make_backend, compile,
inductor_pass, the Unsloth integration) and passed whole to the pass. GraphMoePass.uuid() hashes its fields, so a
compiled-graph cache never serves a graph rewritten under other settings.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RewriteSettings:
    """How graph_moe rewrites an expert loop.

    fuse_projections: compute projections that read the same rows (gate and up) with one grouped GEMM.
    router_topk: on CUDA, the router's top-k of a softmax as one Triton kernel of k arg-max steps
        (graph_moe/kernels/router_topk.py) instead of ATen's top-k; the experts chosen are the same, ties included.
    low_memory_4bit: bitsandbytes 4-bit (QLoRA) experts dequantized a few at a time inside their grouped GEMMs
        (graph_moe/kernels/grouped_mm_4bit.py), not all at once: a layer's peak memory below the HF loop's (on CUDA with
        Triton). False: each projection's experts dequantized at once, faster (~10%) for ~0.5 GB more at
        Qwen3-30B-A3B.
    """

    fuse_projections: bool = True
    router_topk: bool = True
    low_memory_4bit: bool = True

    def __post_init__(self):
        for name, value in self.as_dict().items():
            if not isinstance(value, bool):  # hashed into the pass uuid by value: 1 and True would differ there
                raise TypeError(f"graph_moe: {name} must be a bool, not {value!r}")

    @classmethod
    def of(cls, settings: RewriteSettings | None = None, **fields) -> RewriteSettings:
        """`settings` (default: the defaults) with the `fields` given as keywords replaced: what a public function
        builds from its `settings=` and the keyword arguments users pass (fuse_projections=False, ...)."""
        if settings is not None and not isinstance(settings, RewriteSettings):
            raise TypeError(f"graph_moe: settings must be a graph_moe.RewriteSettings, not {settings!r}")
        return dataclasses.replace(settings or cls(), **fields)

    @classmethod
    def pop_from(cls, kwargs: dict, settings: RewriteSettings | None = None) -> RewriteSettings:
        """`RewriteSettings.of(settings, ...)` with the fields found in `kwargs`, which are removed from it (for a
        function whose other keyword arguments go elsewhere, e.g. to torch.compile)."""
        return cls.of(settings, **{name: kwargs.pop(name) for name in FIELDS if name in kwargs})

    def as_dict(self) -> dict[str, bool]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


FIELDS = tuple(f.name for f in dataclasses.fields(RewriteSettings))

__all__ = ["RewriteSettings", "FIELDS"]
