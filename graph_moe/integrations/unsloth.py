"""graph_moe inside Unsloth: install on the live MoE blocks after Unsloth loads or wraps a model, and compile them.

Unsloth regenerates transformers' model classes into `unsloth_compiled_cache/` (class patches are lost), wraps the
transformers 4.x MoE block forwards it cannot compile in `torch.compiler.disable`, has no option for a custom
backend or pass, and installs its own eager grouped forward (unsloth-zoo `enable_grouped_moe`) on the Mixtral,
Qwen3-MoE and OLMoE blocks it can handle. So graph_moe works where Unsloth's own grouped forward does, on the live
instances, after Unsloth is done with the model:

- `apply(model)` takes the blocks over from Unsloth's grouped forward (its own `disable_grouped_moe`), installs
  graph_moe's traceable forwards (instance attributes: they win over whatever class the compiled cache made, and
  survive its regeneration), and compiles each MoE block on its own with the graph_moe backend and the Inductor
  options Unsloth compiles with (so the block reaches a compiled graph instead of a compile-disabled wrapper),
  and puts the pass into the global Inductor config, so that a block traced inside one of Unsloth's own compiled
  regions (it compiles whole decoder layers) is rewritten there as well.
- `enable()` wraps Unsloth's loaders (`FastLanguageModel`/`FastModel` `.from_pretrained` and `.get_peft_model`)
  and PEFT's `PeftModel.from_pretrained`, so `apply` runs after each of them: after loading, after LoRA is added,
  after a saved adapter is attached.

Both take the rewrite's settings as `graph_moe.compile` does (`settings=graph_moe.RewriteSettings(...)` or its fields
as keywords; `low_memory_4bit=False`: each projection's 4-bit experts dequantized at once, faster for more peak memory
than the default), and are no-ops with a log line when Unsloth is not installed or a model has no supported MoE block.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

from torch import nn

from graph_moe.backend import make_backend
from graph_moe.compile import compile_regions
from graph_moe.inductor_pass import add_global_inductor_pass
from graph_moe.install import install
from graph_moe.passes import RewriteSettings

log = logging.getLogger("graph_moe")

_WRAPPED = "_graph_moe_wrapped"
_enabled_settings: RewriteSettings | None = None  # the rewrite settings enable() was given, for the loads it wraps


def unsloth_available() -> bool:
    return importlib.util.find_spec("unsloth") is not None and importlib.util.find_spec("unsloth_zoo") is not None


def unsloth_compile_options() -> dict:
    """The Inductor options Unsloth compiles its own regions with ({} without Unsloth)."""
    try:
        from unsloth_zoo.temporary_patches.common import torch_compile_options
    except Exception:  # absent, or another unsloth-zoo layout: Inductor's defaults
        return {}
    return dict(torch_compile_options)


def _take_over_from_unsloth(model: nn.Module) -> int:
    """Remove unsloth-zoo's grouped forward from the blocks that carry it; returns how many it had."""
    try:
        from unsloth_zoo.temporary_patches.moe_grouped_modulelist import disable_grouped_moe, grouped_moe_forward
    except Exception:  # no Unsloth, or one without the grouped forward
        return 0
    carried = sum(getattr(m.__dict__.get("forward"), "__func__", None) is grouped_moe_forward for m in model.modules())
    if carried:
        disable_grouped_moe(model)
        log.info("graph_moe: took over %d MoE block(s) from Unsloth's grouped forward", carried)
    return carried


def apply(model: nn.Module, *, inner="inductor", options: dict | None = None, global_pass: bool | None = None,
          settings: RewriteSettings | None = None, **rewrite_options) -> nn.Module:
    """Install graph_moe on `model`'s MoE blocks (taking them over from Unsloth) and compile each block.

    inner: the compiler run on the rewritten graphs; options: Inductor options (default: Unsloth's own).
    global_pass: also add the pass to the global Inductor config (default: when Unsloth is installed).
    settings, rewrite_options: the rewrite's `graph_moe.RewriteSettings` and any of its fields as keywords, as
    `graph_moe.make_backend` takes them; default: what `enable()` was given.
    Idempotent: run it again after adapters are added or attached. Returns `model`.
    """
    settings = RewriteSettings.of(settings or _enabled_settings, **rewrite_options)
    if unsloth_available() if global_pass is None else global_pass:
        add_global_inductor_pass(settings)
    _take_over_from_unsloth(model)
    report = install(model)
    modules = dict(model.named_modules())
    blocks = [modules[b.path] for b in report.blocks if b.status in ("installed", "already installed")]
    if not blocks:
        log.info("graph_moe: no supported MoE block in %s; left as it is\n%s", type(model).__name__, report)
        return model
    options = unsloth_compile_options() if options is None else options
    backend = make_backend(inner, options=options if inner == "inductor" else None, settings=settings)
    compiled = compile_regions(blocks, backend, keep_compiled=True, trace_once=True)
    model._graph_moe_install_report = report
    log.info("graph_moe: %d MoE block(s) installed, %d newly compiled", report.num_installed, compiled)
    return model


def _apply_after(func, owner: str):
    """Wrap a loader so that `apply` runs on the model it returns (alone or first in a tuple)."""
    if getattr(func, _WRAPPED, False):
        return func

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        result = func(*args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result
        if isinstance(model, nn.Module):
            apply(model)
        return result

    setattr(wrapper, _WRAPPED, True)
    log.debug("graph_moe: wrapped %s", owner)
    return wrapper


def enable(settings: RewriteSettings | None = None, **rewrite_options) -> bool:
    """Make every Unsloth load (and PEFT adapter attach) end with `apply`, with these rewrite settings (as
    `graph_moe.make_backend` takes them, e.g. low_memory_4bit=False). Returns False without Unsloth."""
    global _enabled_settings
    if not unsloth_available():
        log.info("graph_moe: Unsloth is not installed; graph_moe.integrations.unsloth.enable() does nothing "
                 "(use graph_moe.compile(model) instead)")
        return False
    _enabled_settings = RewriteSettings.of(settings, **rewrite_options)
    import unsloth  # noqa: F401  (Unsloth must be imported before transformers' models are built)
    from peft import PeftModel

    for cls in (getattr(unsloth, "FastLanguageModel", None), getattr(unsloth, "FastModel", None)):
        if cls is None:
            continue
        for name in ("from_pretrained", "get_peft_model"):
            if hasattr(cls, name):
                setattr(cls, name, staticmethod(_apply_after(getattr(cls, name), f"{cls.__name__}.{name}")))
    PeftModel.from_pretrained = classmethod(_apply_after(PeftModel.from_pretrained.__func__, "PeftModel.from_pretrained"))
    log.info("graph_moe: enabled for Unsloth (installs after from_pretrained, get_peft_model, adapter loads)")
    return True
