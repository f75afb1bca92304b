"""`graph_moe.compile`: install, the Dynamo settings the loop needs, and torch.compile per decoder layer.

The unrolled loop only reaches one Dynamo graph when Dynamo may capture `torch.where` (a dynamic-shape
op). Those settings are read when Dynamo traces, which happens at the first call, not at
`torch.compile` time, so each compiled region applies them around its own calls and nowhere else.

Regional compilation: every decoder layer is compiled on its own. Identical layers share one
compiled code object, so Dynamo traces the expert loop once per layer kind instead of once per
layer (docs/design.md: tracing the E unrolled bodies alone costs seconds per block at E=128). Where the
bodies are expert 0's reading row e of stacked weights, the regions trace expert 0's body alone
(`TraceOnce`, passes/traced_once.py).

Generation: a decoder layer called with a KV cache indexes the cache by its own `layer_idx`, which Dynamo specializes:
compiled whole, every layer would compile its own prefill and decode graphs (and a 48-layer model would pass Dynamo's
recompile limit). Such calls without grad (generate, evaluation) run the layer's attention eagerly and its MoE blocks
compiled alone, whose graphs every layer shares: one for prefill, one for decode, whatever the number of layers.
Training calls that carry a cache (`use_cache` left on) keep the whole layer compiled, with a warning.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from graph_moe import layout_check
from graph_moe.backend import make_backend
from graph_moe.families import common
from graph_moe.install import INSTALLED_MARK, InstallReport, install
from graph_moe.layout import layout_of
from graph_moe.passes import RewriteSettings, TraceEveryExpert

log = logging.getLogger("graph_moe")

# optimize_ddp: under DDP, Dynamo's DDPOptimizer splits each graph at gradient-bucket boundaries BEFORE the backend
# sees it, cutting the expert loop into pieces no pass can prove whole. Each compiled region (a decoder layer) stays
# one graph instead; its gradients still reach DDP's buckets as that layer's backward ends, so communication
# overlaps layer by layer.
# fake_tensor_cache_enabled: every op of the E unrolled bodies has its own unbacked row count, so Dynamo's fake-tensor
# cache misses on ~92% of them and building and checking each entry costs more than the op: tracing a 128-expert
# layer takes 30% less time without it. The backend and the Inductor pass turn it back on for AOTAutograd and
# Inductor (backend.py, inductor_pass.py); another backend compiled under these settings runs without it (slower
# to compile, same result).
# skip_fwd_side_effects_in_bwd_under_checkpoint: transformers 5.25's checkpointed decoder layer sets its
# output-capturing context variable inside torch.utils.checkpoint, which Dynamo otherwise refuses (a graph break: the
# layer would run eagerly). That variable only collects forward outputs: not setting it again while the backward
# recomputes the layer is what checkpointing wants (other forward side effects in a compiled layer are not replayed
# in the recompute either).
CAPTURE_SETTINGS = dict(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True, optimize_ddp=False,
                        fake_tensor_cache_enabled=False)
if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):  # not in every torch >= 2.9
    CAPTURE_SETTINGS["skip_fwd_side_effects_in_bwd_under_checkpoint"] = True


def capture_settings():
    """The Dynamo settings under which the range loop is traced into one graph (a context manager)."""
    return torch._dynamo.config.patch(**CAPTURE_SETTINGS)


# dynamic=True makes the floats Dynamo reads (norm epsilons, LoRA scalings) symbolic too; AOTAutograd then
# specializes them by restarting the whole trace, and the layer compiles twice. They never vary: keep them constants.
DYNAMIC_SETTINGS = dict(specialize_float=True)


class TraceOnce:
    """Whether the compiled regions sharing this object may trace each expert loop with expert 0's body alone
    (passes/traced_once.py); switched off for all of them when one loop traced so cannot be rewritten."""

    def __init__(self, enabled: bool):
        self.enabled = enabled


@functools.cache
def _cache_class() -> type:
    """transformers' KV cache base class (looked up once: this runs on every decoder-layer call)."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return type(None)  # matches no argument that could be a cache
    return Cache


def _with_kv_cache(args, kwargs) -> bool:
    """Whether a transformers KV cache (`past_key_values` in 4.x, `cache` in late 5.x) is among the arguments."""
    cache = _cache_class()
    return any(isinstance(value, cache) for value in (*args, *kwargs.values()))


_warned_stacked_per_step = _warned_training_with_cache = False


def _warn_training_with_cache() -> None:
    """Once per process: a call with grad enabled that carries a KV cache (transformers makes one whenever
    `use_cache` is on, the config's default) compiles the whole layer, once per layer (its `layer_idx`)."""
    global _warned_training_with_cache
    if not _warned_training_with_cache:
        _warned_training_with_cache = True
        log.warning("graph_moe: a training call carries a KV cache (use_cache=True, the config's default): each "
                    "decoder layer compiles its own graph; pass use_cache=False (or set model.config.use_cache = "
                    "False) to train with one graph for all layers")


def _warn_if_stacked_per_step(blocks) -> None:
    """Once per process: generating with trainable ModuleList experts (a model as loaded) stacks their weights on
    every decode step, a copy of every expert weight per token."""
    global _warned_stacked_per_step
    if _warned_stacked_per_step:
        return
    owners = [m for block in blocks for m in block.modules() if isinstance(m._modules.get("experts"), nn.ModuleList)]
    if any(layout_of(m) is None and any(p.requires_grad for p in m.experts.parameters()) for m in owners):
        _warned_stacked_per_step = True
        log.warning("graph_moe: generating with trainable expert weights: they are stacked on every step (a copy of "
                    "every expert weight per token); call model.requires_grad_(False) before graph_moe.compile to lay "
                    "them out once")


def _tokens_dynamic(compiled, hidden, *args, **kwargs):
    """Call `compiled` with the batch and sequence sizes of `hidden` traced as symbols where they exceed 1: prompts of
    every length share one prefill graph (a decode step's sequence size 1 keeps its own)."""
    if isinstance(hidden, torch.Tensor):
        for dim in range(hidden.dim() - 1):
            if hidden.shape[dim] > 1:
                torch._dynamo.maybe_mark_dynamic(hidden, dim)
    return compiled(hidden, *args, **kwargs)


_ABSENT = object()  # an instance attribute that was not there


class _WithCaptureSettings:
    """A compiled callable that applies the capture settings (and `extra` Dynamo settings) around each call, and
    checks the grouped layouts of the MoE blocks in `region` in plain Python before it (layout_check.py).
    trace_once: a TraceOnce, for callables compiled with graph_moe's backend (whose pass rewrites loops traced once)."""

    def __init__(self, compiled, region: nn.Module, extra=None, trace_once: TraceOnce | None = None, *, backend=None,
                 compile_kwargs=None):
        self.compiled, self.settings = compiled, {**CAPTURE_SETTINGS, **(extra or {})}
        self.extra, self.backend, self.compile_kwargs = extra, backend, compile_kwargs or {}
        self.trace_once = trace_once or TraceOnce(False)
        self.region, self.laid_out = region, None
        self.blocks = None  # installed MoE blocks of the region and their own compiled calls, for calls with a KV cache

    def __call__(self, *args, **kwargs):
        if not torch.compiler.is_compiling() and _with_kv_cache(args, kwargs):
            if torch.is_grad_enabled():
                _warn_training_with_cache()
            elif self._compiled_blocks():  # generation, evaluation
                return self._eager_layer_compiled_blocks(*args, **kwargs)
        return self._compiled_call(*args, **kwargs)

    def _compiled_blocks(self) -> list:
        """(block, its own compiled call) for the region's children holding an installed module: the MoE block
        (transformers 5.x: the block around the experts module, so that routing and experts trace from one input).
        Empty where the region is an installed block itself."""
        if self.blocks is None:
            blocks = [] if INSTALLED_MARK in self.region.__dict__ else [
                child for child in self.region.children() if any(INSTALLED_MARK in m.__dict__ for m in child.modules())]
            _warn_if_stacked_per_step(blocks)
            self.blocks = [(block, functools.partial(_tokens_dynamic, _WithCaptureSettings(
                               torch.compile(block._call_impl, backend=self.backend, **self.compile_kwargs), block,
                               self.extra, self.trace_once)))
                           for block in blocks]
        return self.blocks

    def _eager_layer_compiled_blocks(self, *args, **kwargs):
        """The region's own forward, eagerly, with each MoE block in it run compiled alone."""
        # set on the instances for this call only, and put back as found (Dynamo guards on the attribute's place)
        saved = [(block, block.__dict__.get("_compiled_call_impl", _ABSENT)) for block, _ in self.blocks]
        for block, compiled in self.blocks:
            block._compiled_call_impl = compiled
        try:
            return self.region._call_impl(*args, **kwargs)
        finally:
            for block, value in saved:
                if value is _ABSENT:
                    del block.__dict__["_compiled_call_impl"]
                else:
                    block.__dict__["_compiled_call_impl"] = value

    def _compiled_call(self, *args, **kwargs):
        # Set and restored by hand, on every layer call: torch._dynamo.config.patch took 22-31 us per call on a 2-core
        # CPU, this 15 (a decode step of a 48-layer model calls it 48 times).
        config = torch._dynamo.config
        saved = [(name, getattr(config, name)) for name in self.settings]
        for name, value in self.settings.items():
            setattr(config, name, value)
        # Traced by another torch.compile around this one (not graph_moe's backend then): every body.
        outer = torch.compiler.is_compiling()
        once = self.trace_once.enabled and not outer
        saved_once, common.TRACE_EXPERTS_ONCE = common.TRACE_EXPERTS_ONCE, once
        saved_region, common.IN_GRAPH_MOE_REGION = common.IN_GRAPH_MOE_REGION, not outer
        if self.laid_out is None:  # found at the first call: graph_moe.install runs before it
            self.laid_out = layout_check.laid_out_blocks(self.region)
        # Those not verified already by the model's hooks (layout_check.watch), which then clear them
        blocks = () if outer else layout_check.verify_blocks(self.laid_out)
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            why = _cause(error, TraceEveryExpert)
            if why is None or not once:
                raise
            log.warning("graph_moe: %s; tracing every expert's body instead (slower to compile)", why)
            self.trace_once.enabled = common.TRACE_EXPERTS_ONCE = False
            return self.compiled(*args, **kwargs)
        finally:
            layout_check.clear_blocks(blocks)
            common.TRACE_EXPERTS_ONCE, common.IN_GRAPH_MOE_REGION = saved_once, saved_region
            for name, value in saved:
                setattr(config, name, value)


def _cause(error: BaseException, kind: type) -> BaseException | None:
    """The first exception of type `kind` in `error`'s chain of causes, or None."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or getattr(error, "inner_exception", None)
    return error


def decoder_layers(model: nn.Module, report: InstallReport) -> list[nn.Module]:
    """The modules to compile: every decoder layer of a ModuleList holding an installed MoE block
    ("model.layers.3.mlp" -> each module of "model.layers"), or the block itself."""
    modules = dict(model.named_modules())
    regions: dict[int, nn.Module] = {}
    for entry in report.blocks:
        if not entry.status.endswith("installed"):
            continue
        parts = entry.path.split(".")
        members = [modules[entry.path]]
        for i in range(len(parts) - 1, 0, -1):
            parent = modules.get(".".join(parts[:i]))
            if parts[i].isdigit() and isinstance(parent, nn.ModuleList):
                members = list(parent)
                break
        regions.update((id(m), m) for m in members)
    return list(regions.values())


def compile_regions(regions, backend, *, keep_compiled: bool = False, trace_once: bool = False,
                    **torch_compile_kwargs) -> int:
    """Compile each module in `regions` on its own (what `module.compile()` does), under the capture settings.
    keep_compiled: leave modules graph_moe compiled before as they are. trace_once: `backend` is graph_moe's, whose
    pass rewrites a loop of uniform experts traced with expert 0's body alone (passes/traced_once.py); a loop it
    cannot rewrite so is traced again with every body. Returns how many were compiled now."""
    compiled, once = 0, TraceOnce(trace_once)
    for region in regions:
        if keep_compiled and isinstance(region.__dict__.get("_compiled_call_impl"), _WithCaptureSettings):
            continue
        region._compiled_call_impl = _WithCaptureSettings(
            torch.compile(region._call_impl, backend=backend, **torch_compile_kwargs), region,
            DYNAMIC_SETTINGS if torch_compile_kwargs.get("dynamic") else None, once, backend=backend,
            compile_kwargs=torch_compile_kwargs)
        compiled += 1
    return compiled


def compile(model: nn.Module, *, inner="inductor", regional: bool = True, settings: RewriteSettings | None = None,
            stack_experts: bool = False, trace_experts_once: bool = True, keep_transformers_grouped: bool = False,
            **torch_compile_kwargs) -> nn.Module:
    """Install graph_moe on `model` and compile it with the graph_moe backend, in place.

    inner: the compiler run on the rewritten graphs ("inductor", "aot_eager", "eager" or a backend).
    regional: compile each decoder layer holding an MoE block on its own (default), or the whole
        model as one region.
    settings: the rewrite's `graph_moe.RewriteSettings`; its fields may also be given as keywords
        (fuse_projections=False, router_topk=False, low_memory_4bit=False), as `graph_moe.make_backend` takes them.
    stack_experts: passed to `graph_moe.install` (expert weights as stacked parameters: full fine-tuning of the
        experts without a per-forward copy; for FSDP2, install with it before `fully_shard` instead).
    trace_experts_once: let Dynamo trace expert 0's body alone for a loop whose experts are uniform by construction
        (laid out, no per-expert adapters), which the pass then groups over every expert: a 128-expert layer compiles
        in about half the time. Off: every body traced and proven, as with `graph_moe.backend`.
    keep_transformers_grouped: passed to `graph_moe.install` (leave transformers 5.x experts running transformers'
        own grouped_mm / batched_mm forward as they are; by default graph_moe takes them over).
    torch_compile_kwargs: passed to torch.compile (mode=, options=, dynamic=, fullgraph=, ...), less the rewrite's
        settings.
    Returns `model`, whose calls now run compiled; `model._graph_moe_install_report` says what was installed.
    """
    settings = RewriteSettings.pop_from(torch_compile_kwargs, settings)
    report = install(model, stack_experts=stack_experts, keep_transformers_grouped=keep_transformers_grouped)
    backend = make_backend(inner, settings=settings)
    regions = decoder_layers(model, report) if regional else [model]
    if not regions:
        log.warning("graph_moe.compile: no supported MoE block in %s; compiling the whole model", type(model).__name__)
        regions = [model]
    compile_regions(regions, backend, trace_once=trace_experts_once, **torch_compile_kwargs)
    model._graph_moe_install_report = report
    log.info("graph_moe.compile: %d MoE block(s) installed, %d region(s) compiled", report.num_installed, len(regions))
    return model
