"""transformers 5.x experts modules (`@use_experts_implementation`, 3D weights), whatever their experts_implementation.

In 5.x each MoE layer keeps its experts in one module holding 3D parameters (`gate_up_proj` (E, 2I, H) and `down_proj`
(E, H, I) in most models; transposed, with biases, or without a gate in others). The decorator dispatches the
module's forward on `config._experts_implementation`: "grouped_mm" (5.x's default on torch >= 2.9) and "batched_mm"
are transformers' own grouped forwards, "eager" loops over the experts that were hit (`nonzero`: no graph can hold
that loop). `install` takes all three over, by default: it puts `generic_experts_forward` on the experts INSTANCE (the
decorator's dispatch is then not called): the class's own eager loop rewritten over `range(E)` (transformers5_generic.py:
derived from the syntax tree of whatever transformers release is installed, refused with the reason where it cannot
be made exact), which the pass proves and groups, with the 3D parameters themselves as the stacks (no copy).
`install(model, keep_transformers_grouped=True)` leaves modules running grouped_mm / batched_mm as they are; an
implementation registered by someone else is refused by its name. The block around the experts (router, shared
expert) traces as it is.

Experts modules are found by structure, not by class name: a module whose class forward is the dispatch of
`use_experts_implementation` (transformers/integrations/moe.py) and that has an integer `num_experts`.

PEFT `target_parameters` (LoRA on the 3D parameters): PEFT wraps the experts in nested `ParamWrapper`s whose forward
registers a parametrization (W + scaling * B @ A, a new weight stack and a new module class on every call: under
torch.compile that graph-breaks and recompiles every step). `bind_lora_wrappers` (run by install) gives those
wrappers a forward that hands themselves down to the experts' forward, which adds each adapter as PEFT's own factors
(`get_delta_factors`): x @ (W + s * B_e @ A_e)^T computed as x @ W_e^T + s * (x @ A_e^T) @ B_e^T, i.e. the base
grouped GEMM plus two small grouped GEMMs per adapter, and no (E, out, in) weight built per forward. That needs the
loop to read the parameter only as `F.linear(x, P[e])`; disabled or merged adapters are skipped, as PEFT skips them.
Wrappers install cannot bind (LoRA on a parameter read another way, e.g. gpt-oss's transposed `x @ P[e]`, a PEFT
without `get_delta_factors`, wrapped after install without installing again) keep PEFT's forward, and the loop then
reads the parametrized weights PEFT builds: correct, but rebuilt (and recompiled) per call.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from graph_moe.families import transformers5_generic
from graph_moe.families.common import Family
from graph_moe.families.transformers5_generic import LORA_KWARG, generic_experts_forward

# transformers' own forwards that graph_moe replaces; "eager" is the class's loop itself.
TAKEN_OVER = ("eager", "grouped_mm", "batched_mm")
TRANSFORMERS_GROUPED = ("grouped_mm", "batched_mm")


def implementation(experts: nn.Module) -> str:
    """The experts_implementation the module runs now ("eager" for a module without a config, as transformers)."""
    return getattr(getattr(experts, "config", None), "_experts_implementation", None) or "eager"


def lora_wrapper_forward(self, x, *args, **kwargs):
    """A bound PEFT ParamWrapper: pass itself down to the experts' traceable forward, which adds the adapters
    grouped, instead of registering PEFT's per-call parametrization. PEFT's own forward where it does more
    than add adapters (mixed adapter batches; disabled while merged, which unmerges)."""
    if kwargs.get("adapter_names") is not None or (self.disable_adapters and self.merged):
        return type(self).forward(self, x, *args, **kwargs)
    kwargs[LORA_KWARG] = kwargs.get(LORA_KWARG, ()) + (self,)
    return self.base_layer(x, *args, **kwargs)


WRAPPER_FORWARDS = frozenset({lora_wrapper_forward})


def _bindable(wrapper: nn.Module, linear_reads: tuple[str, ...]) -> str | None:
    if not all(hasattr(wrapper, a) for a in ("parameter_name", "get_delta_factors", "lora_A", "base_layer")):
        return f"{type(wrapper).__name__} is not a PEFT ParamWrapper with get_delta_factors (peft >= 0.21)"
    if wrapper.parameter_name not in linear_reads:
        return f"LoRA on {wrapper.parameter_name}, which the loop reads other than as F.linear(x, {wrapper.parameter_name}[e])"
    if not getattr(wrapper, "_did_swap_in_out_features", False):
        return "a ParamWrapper that reads the experts as (E, in, out)"
    forward = wrapper.__dict__.get("forward")
    if forward is not None and getattr(forward, "__func__", None) not in WRAPPER_FORWARDS:
        return "a ParamWrapper whose forward is already replaced on the instance"
    return None


def bind_lora_wrappers(experts: nn.Module, wrappers: list[nn.Module]) -> str:
    """Give the PEFT ParamWrappers around `experts` (outermost first) `lora_wrapper_forward`; the report's text."""
    linear_reads = transformers5_generic.linear_reads(type(experts))
    bound, left = [], []
    for wrapper in wrappers:
        why = _bindable(wrapper, linear_reads)
        if why is None:
            wrapper.forward = types.MethodType(lora_wrapper_forward, wrapper)
            bound.append(wrapper.parameter_name)
        else:
            left.append(why)
    four_bit = [name for name in linear_reads if not isinstance(getattr(experts, name, None), torch.Tensor)]
    text = "3D, stacked by the model" + (f"; {', '.join(four_bit)} in 4-bit" if four_bit else "")
    if implementation(experts) != "eager":
        text += f" (took over experts_implementation={implementation(experts)!r})"
    if bound:
        bound = [name for name in linear_reads if name in bound]  # in the loop's order: gate_up_proj, down_proj
        text += f"; LoRA on {', '.join(bound)} as grouped GEMMs"
    if left:
        text += f"; left to PEFT (weights rebuilt per forward): {'; '.join(left)}"
    return text


def experts_check(experts: nn.Module) -> str | None:
    """Why `experts` cannot take the range loop derived from its own class's eager forward, or None (the derived
    forward is then registered for its class)."""
    if not is_5x_experts(experts):  # an experts module whose class forward someone else replaced
        forward = type(experts).forward
        return (f"{type(experts).__name__}.forward is replaced on the class by {forward.__module__}."
                f"{forward.__qualname__}, not transformers' experts dispatch (Unsloth does this, and keeps its MoE "
                "blocks out of torch.compile): left as it is")
    used = implementation(experts)
    if used not in TAKEN_OVER:
        return (f"experts_implementation={used!r} is not one graph_moe replaces ({', '.join(TAKEN_OVER)}): "
                "left as it is")
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism (sentinel expert ids)"
    if not isinstance(getattr(experts, "num_experts", None), int):
        return "no integer num_experts"
    return transformers5_generic.register(type(experts))


FAMILY = Family(generic_experts_forward, "H", (), None, experts_check, bind_lora_wrappers)
FAMILIES: dict[str, Family] = {}  # found by structure (`is_5x_experts`), not by name


def is_5x_experts(module: nn.Module) -> bool:
    """An experts module under transformers 5.x's @use_experts_implementation (its class forward is the decorator's
    dispatch, which keeps the class's own forward as `__wrapped__`): 4.x classes of the same names are not."""
    forward = getattr(type(module), "forward", None)
    code = getattr(forward, "__code__", None)
    return (getattr(forward, "__wrapped__", None) is not None and code is not None
            and code.co_filename.replace("\\", "/").endswith("transformers/integrations/moe.py"))


def looks_like_5x_experts(module: nn.Module) -> bool:
    """A 5.x experts module, or one of its shape (a class named *Experts holding 3D parameters of one row per expert)
    whose class forward was replaced from another module (Unsloth's patches): the latter gets a report line saying so.
    A class with its own forward (4.57's Qwen3VLMoeTextExperts) is neither."""
    if is_5x_experts(module):
        return True
    num_experts, forward = getattr(module, "num_experts", None), getattr(type(module), "forward", None)
    return (type(module).__name__.endswith("Experts") and isinstance(num_experts, int)
            and getattr(forward, "__module__", None) != type(module).__module__
            and any(p.dim() == 3 and p.shape[0] == num_experts for p in module.parameters(recurse=False)))


def delegates_to_experts(block: nn.Module) -> bool:
    """A 5.x MoE block (router + experts module): its line in the report is its experts module's."""
    experts = getattr(block, "experts", None)
    if hasattr(experts, "get_base_layer"):  # PEFT ParamWrappers around the experts
        experts = experts.get_base_layer()
    return isinstance(experts, nn.Module) and looks_like_5x_experts(experts)
