"""transformers 5.x experts modules (`@use_experts_implementation`, 3D weights) with experts_implementation="eager".

In 5.x each MoE layer keeps its experts in one module with two 3D parameters, `gate_up_proj` (E, 2I, H: gate rows
then up rows) and `down_proj` (E, H, I). The decorator dispatches that module's forward on
`config._experts_implementation`:
- "eager" loops over the experts that were hit (`nonzero`, form H): no graph can hold that loop. `install` puts
  `experts_forward` on the experts INSTANCE: the same body over `range(E)`, each projection a 3D slice
  `F.linear(x, self.gate_up_proj[e])`, which the pass groups with the 3D parameter itself as the stack (no copy).
  The block around the experts (router, shared expert) traces as it is and is left alone.
- "grouped_mm" (5.x's default on torch >= 2.9) and "batched_mm" are transformers' own grouped forwards: already
  one graph of grouped GEMMs / bmms with no loop. `install` leaves them and says so: taking them over would make
  Dynamo trace E unrolled bodies (seconds per layer kind at E=128) for the pass to fold back into the grouped
  GEMMs transformers already runs (benchmarks/RESULTS.md: graph_moe and the compiled 5.x-style grouped forward are
  level).

Which classes: every 5.24 class whose eager forward is the standard loop is listed by name (below), and each
instance is checked by structure: its class's own eager forward must be one of the two standard loops (compared
as syntax trees, so another version's or a remote-code class's different loop is refused, not guessed at), its
parameters must have the 3D shapes above and `self._apply_gate` must read one row at a time (the pass proves it).

Classes whose eager loop is another one (transposed weights, biases, an fp32 accumulator, a norm per expert, no gate)
are listed by name in `_DERIVED_CLASSES`: their range loop is derived from their own eager forward's syntax tree
(transformers5_generic.py: the same statements over `range(E)`, refused with the reason where the loop's structure
does not make that exact). What the pass does with the result is its own proof; on transformers 5.24 (tests/
transformers5/test_tf5_derived_experts.py) all seven are grouped: AriaExperts, GptOssExperts, Inkling2Experts,
Inkling2LoopExperts, NemotronHExperts, OpenAIPrivacyFilterExperts (each expert's slice cast to fp32: the stack is
cast once) and MuseSparkExperts (a per-row RMSNorm after each expert).

PEFT `target_parameters` (LoRA on the 3D parameters): PEFT wraps the experts in nested `ParamWrapper`s whose forward
registers a parametrization (W + scaling * B @ A, a new weight stack and a new module class on every call: under
torch.compile that graph-breaks and recompiles every step). `bind_lora_wrappers` (run by install) gives those
wrappers a forward that hands themselves down to `experts_forward`, which adds each adapter as PEFT's own factors
(`get_delta_factors`): x @ (W + s * B_e @ A_e)^T computed as x @ W_e^T + s * (x @ A_e^T) @ B_e^T, i.e. the base
grouped GEMM plus two small grouped GEMMs per adapter, and no (E, out, in) weight built per forward. Disabled or
merged adapters are skipped, as PEFT skips them. Wrappers install cannot bind (LoRA on another parameter, a PEFT
without `get_delta_factors`, wrapped after install without installing again) keep PEFT's forward, and
`experts_forward` then reads the parametrized weights PEFT builds: correct, but rebuilt (and recompiled) per call.
LoRA on the derived-loop classes always takes that PEFT path (`derived_wrappers` says so in the report).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types

import torch
import torch.nn.functional as F
from torch import nn

from graph_moe.families import transformers5_generic
from graph_moe.families.common import Family, trace_once_requested

_LORA_KWARG = "_graph_moe_lora"  # the bound ParamWrappers, passed down from the outermost one


def experts_forward(self, hidden_states, top_k_index, top_k_weights, **kwargs):
    """transformers 5.x eager experts forward, over every expert in order: visiting an expert without tokens adds
    nothing, so the sum is the same, term for term, as the original's loop over the experts hit."""
    wrappers = kwargs.get(_LORA_KWARG, ())
    gate_up_lora = _lora_factors(wrappers, "gate_up_proj")
    down_lora = _lora_factors(wrappers, "down_proj")
    final_hidden_states = torch.zeros_like(hidden_states)
    # The original's one_hot has a class for the expert-parallel sentinel id E; `check` refuses expert parallelism,
    # so every id is below E and one_hot(E) gives the same mask for the experts.
    expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
    # Every body is expert 0's reading row e of the 3D weights and adapter factors: traced once for graph_moe's
    # backend, which groups it over every expert (passes/traced_once.py).
    once = trace_once_requested()
    for expert_idx in range(1 if once else self.num_experts):
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate_up = _linear_plus_lora(current_state, self.gate_up_proj, expert_idx, gate_up_lora)
        current_hidden_states = self._apply_gate(gate_up)
        current_hidden_states = _linear_plus_lora(current_hidden_states, self.down_proj, expert_idx, down_lora)
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    if once:
        stacks = [self.gate_up_proj, self.down_proj, *(t for a, b, _ in gate_up_lora + down_lora for t in (a, b))]
        return torch.ops.graph_moe.every_expert_as_expert_0(final_hidden_states, self.num_experts, stacks)
    return final_hidden_states


def _linear_plus_lora(x, stack, e, lora):
    out = F.linear(x, stack[e])
    for a_stack, b_stack, scaling in lora:
        out = out + F.linear(F.linear(x, a_stack[e]), b_stack[e]) * scaling
    return out


def _lora_factors(wrappers, parameter_name):
    """(A (E, r, in), B (E, out, r), scaling) of each adapter PEFT would add to `parameter_name` now.

    PEFT's ParamWrapper.forward adds the active adapters unless disabled or merged (then the base already holds
    them); the factors are PEFT's own, in the parameter's dtype, as its forward folds them."""
    factors = []
    for wrapper in wrappers:
        if wrapper.parameter_name != parameter_name or wrapper.disable_adapters or wrapper.merged:
            continue
        for adapter in wrapper.active_adapters:
            if adapter in wrapper.lora_A:
                b_stack, a_stack, scaling = wrapper.get_delta_factors(adapter)
                # B is a permuted view of lora_B.weight (experts innermost), which torch._grouped_mm rejects: copy it
                # expert-major (r columns wide: small). Into a new tensor, because Inductor drops `.contiguous()`
                # before _grouped_mm, whose fallback only asks for some unit stride (torch 2.13).
                factors.append((a_stack, b_stack.new_empty(b_stack.shape).copy_(b_stack), scaling))
    return factors


def lora_wrapper_forward(self, x, *args, **kwargs):
    """A bound PEFT ParamWrapper: pass itself down to the experts' traceable forward, which adds the adapters
    grouped, instead of registering PEFT's per-call parametrization. PEFT's own forward where it does more
    than add adapters (mixed adapter batches; disabled while merged, which unmerges)."""
    if kwargs.get("adapter_names") is not None or (self.disable_adapters and self.merged):
        return type(self).forward(self, x, *args, **kwargs)
    kwargs[_LORA_KWARG] = kwargs.get(_LORA_KWARG, ()) + (self,)
    return self.base_layer(x, *args, **kwargs)


WRAPPER_FORWARDS = frozenset({lora_wrapper_forward})


def _bindable(wrapper: nn.Module) -> str | None:
    if not all(hasattr(wrapper, a) for a in ("parameter_name", "get_delta_factors", "lora_A", "base_layer")):
        return f"{type(wrapper).__name__} is not a PEFT ParamWrapper with get_delta_factors (peft >= 0.21)"
    if wrapper.parameter_name not in ("gate_up_proj", "down_proj"):
        return f"LoRA on {wrapper.parameter_name}"
    if not getattr(wrapper, "_did_swap_in_out_features", False):
        return "a ParamWrapper that reads the experts as (E, in, out)"
    forward = wrapper.__dict__.get("forward")
    if forward is not None and getattr(forward, "__func__", None) not in WRAPPER_FORWARDS:
        return "a ParamWrapper whose forward is already replaced on the instance"
    return None


def bind_lora_wrappers(experts: nn.Module, wrappers: list[nn.Module]) -> str:
    """Give the PEFT ParamWrappers around `experts` (outermost first) `lora_wrapper_forward`; the report's text."""
    bound, left = [], []
    for wrapper in wrappers:
        why = _bindable(wrapper)
        if why is None:
            wrapper.forward = types.MethodType(lora_wrapper_forward, wrapper)
            bound.append(wrapper.parameter_name)
        else:
            left.append(why)
    text = "3D, stacked by the model"
    if bound:
        text += f"; LoRA on {', '.join(p for p in ('gate_up_proj', 'down_proj') if p in bound)} as grouped GEMMs"
    if left:
        text += f"; left to PEFT (weights rebuilt per forward): {'; '.join(left)}"
    return text


# The two standard 5.x eager loops (transformers 5.24): the first is the body of MixtralExperts, Qwen3MoeExperts,
# OlmoeExperts and 52 other classes; the second that of classes with their own `_apply_gate`.
_STANDARD_LOOPS = (
    """
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = nn.functional.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        current_hidden_states = nn.functional.linear(current_hidden_states, self.down_proj[expert_idx])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states
    """,
    """
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(mask[expert_idx])
        current = self._apply_gate(F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]))
        current = F.linear(current, self.down_proj[expert_idx]) * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, current.to(final.dtype))
    return final
    """,
)


def _body_dump(statements) -> str:
    """The statements as a syntax tree, without a leading docstring."""
    if statements and isinstance(statements[0], ast.Expr) and isinstance(statements[0].value, ast.Constant):
        statements = statements[1:]
    return "\n".join(ast.dump(s) for s in statements)


_STANDARD_DUMPS = frozenset(_body_dump(ast.parse(textwrap.dedent(src)).body) for src in _STANDARD_LOOPS)


@functools.lru_cache(maxsize=None)
def _is_standard_loop(forward) -> bool:
    """The standard loop, with the arguments in the order the blocks pass them."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
        arguments = list(inspect.signature(forward).parameters)
    except (OSError, TypeError, SyntaxError, ValueError):
        return False
    return (arguments == ["self", "hidden_states", "top_k_index", "top_k_weights"]
            and _body_dump(tree.body[0].body) in _STANDARD_DUMPS)


def _not_eager(experts: nn.Module) -> str | None:
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if implementation != "eager":
        return (f"experts_implementation={implementation!r} is transformers' own grouped forward (one graph, no "
                "loop): left as it is")
    return None


def experts_check(experts: nn.Module) -> str | None:
    """Why `experts` cannot take `experts_forward`, or None."""
    why = _not_eager(experts)
    if why is not None:
        return why
    original = getattr(type(experts).forward, "__wrapped__", None)  # under @use_experts_implementation
    if original is None or not _is_standard_loop(original):
        return f"{type(experts).__name__}'s eager forward is not the standard transformers 5.x expert loop"
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism (sentinel expert ids)"
    gate_up, down, num_experts = (getattr(experts, a, None) for a in ("gate_up_proj", "down_proj", "num_experts"))
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3):
        return "gate_up_proj / down_proj are not 3D tensors"
    e, two_i, h = gate_up.shape
    if not isinstance(num_experts, int) or e != num_experts or tuple(down.shape) != (e, h, two_i // 2):
        return f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not (E, 2I, H), (E, H, I)"
    return None


# transformers 5.24 classes whose eager forward is one of _STANDARD_LOOPS.
_CLASSES = (
    "AfmoeExperts", "AXK1Experts", "AXK2Experts", "BailingHybridExperts", "BeamExperts", "Cohere2MoeExperts",
    "DeepseekOcr2TextExperts", "DeepseekV2Experts", "DeepseekV3Experts", "DeepseekV32Experts", "DeepseekV4Experts",
    "DiffusionGemmaTextExperts", "Dots1Experts", "Dots3NoteExperts", "Ernie4_5_MoeExperts",
    "Ernie4_5_VLMoeMoeExperts", "ExaoneMoeExperts", "FlexOlmoExperts", "FlintExperts", "Gemma4TextExperts",
    "Glm4MoeExperts", "Glm4MoeLiteExperts", "Glm4vMoeTextExperts", "Glm5NextTextExperts", "GlmMoeDsaExperts",
    "GraniteMoeExperts", "GraniteMoeHybridExperts", "GraniteMoeSharedExperts", "GraniteMoeSWAExperts",
    "HunYuanMoEV1Experts", "HYV3Experts", "HYV4Experts", "HYV4VLExperts", "InklingExperts", "JambaExperts",
    "KimiLinearExperts", "Kolibri1Experts", "LagunaExperts", "LaraMiniExperts", "Lfm2MoeExperts", "MellumExperts",
    "MiMoV2FlashExperts", "MiniMaxExperts", "MiniMaxM2Experts", "MiniMaxM3VLExperts", "Mistral4Experts",
    "MistralLarge4TextExperts", "MixtralExperts", "OlmoeExperts", "PhimoeExperts", "Qwen2MoeExperts",
    "Qwen3_5MoeExperts", "Qwen3MoeExperts", "Qwen3NextExperts", "Qwen3OmniMoeTalkerTextExperts",
    "Qwen3OmniMoeThinkerTextExperts", "Qwen3VLMoeTextExperts", "Qwen4ExpTextExperts", "SolarOpenExperts",
    "UnlimitedOcrTextExperts", "ZayaExperts",
)

_FAMILY = Family(experts_forward, "H", ("gate_up_proj", "down_proj", "_apply_gate"), None, experts_check,
                 bind_lora_wrappers)


def derived_check(experts: nn.Module) -> str | None:
    """Why `experts` cannot take the range loop derived from its own class's eager forward
    (transformers5_generic.py), or None (the derived forward is then registered for its class)."""
    why = _not_eager(experts)
    if why is not None:
        return why
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism (sentinel expert ids)"
    if not isinstance(getattr(experts, "num_experts", None), int):
        return "no integer num_experts"
    return transformers5_generic.register(type(experts))


def derived_wrappers(experts: nn.Module, wrappers: list[nn.Module]) -> str:
    """PEFT ParamWrappers around a derived-loop experts module keep PEFT's own forward: `lora_wrapper_forward`
    hands the adapters to `experts_forward`, which the derived loops do not take."""
    text = "3D, stacked by the model"
    if wrappers:
        text += "; LoRA left to PEFT's forward (weights rebuilt per forward)"
    return text


# transformers 5.24 classes whose eager loop is not a standard one: the range loop is derived from their own
# forward (transformers5_generic.py). Whether the pass then groups it is the pass's proof (README table).
_DERIVED_CLASSES = ("AriaExperts", "GptOssExperts", "Inkling2Experts", "Inkling2LoopExperts", "MuseSparkExperts",
                    "NemotronHExperts", "OpenAIPrivacyFilterExperts")

_DERIVED_FAMILY = Family(transformers5_generic.generic_experts_forward, "H", (), None, derived_check,
                         derived_wrappers)
FAMILIES = {name: _FAMILY for name in _CLASSES} | {name: _DERIVED_FAMILY for name in _DERIVED_CLASSES}


def delegates_to_experts(block: nn.Module) -> bool:
    """A 5.x MoE block (router + experts module): its line in the report is its experts module's."""
    experts = getattr(block, "experts", None)
    if hasattr(experts, "get_base_layer"):  # PEFT ParamWrappers around the experts
        experts = experts.get_base_layer()
    return is_5x_experts(experts)


def is_5x_experts(module: nn.Module) -> bool:
    """A listed class under @use_experts_implementation (its forward wrapped): 4.x classes of the same name, e.g.
    4.57's Qwen3VLMoeTextExperts inside a Qwen3VLMoeTextSparseMoeBlock (families/stacked.py), are not."""
    return type(module).__name__ in FAMILIES and hasattr(type(module).forward, "__wrapped__")
