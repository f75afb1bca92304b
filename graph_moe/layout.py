"""Frozen expert weights laid out once for grouped GEMMs, with each expert's weight a view into them.

Without a layout, the grouped graph stacks E expert weights into one (E, out, in) tensor on every
forward: a full copy of the expert weights per step (on an H200, 3 ms of a 7 ms Qwen3-30B-A3B layer),
and for training a saved copy per layer. With a layout, `gate_up` (E, 2I, H: each expert's gate rows
then its up rows) and `down` (E, H, I) exist once; every expert's nn.Linear weight becomes a view into
them, so `state_dict()`, in-place updates, `load_state_dict` and PEFT merges read and write the same
memory. The traceable forward then computes expert e from `gate_up[e]` and `down[e]`, and the pass
hands `gate_up` and `down` to torch._grouped_mm as they are.

The layout is used only while it is provably current: the projection modules are the ones laid out, or
PEFT LoRA wrappers around them in plain use (unmerged, vanilla LoRA: the adapters are added as PEFT adds
them), their weights do not require grad (checked with grad enabled only), and the layout was not
invalidated (a parameter re-registered on a laid-out Linear, e.g. `load_state_dict(assign=True)`).
`usable_layout` reads these facts; traced by Dynamo, each read is a guard. graph_moe.compile checks the
same facts in plain Python before each call instead (layout_check.py), far cheaper than 3 x E guards. `.to()`/`.cuda()`/`.half()` rebuild
the views. Assigning a new tensor to `weight.data` by hand bypasses all of this: call `graph_moe.install(model)`
again after it.
When any check fails the forward falls back to calling the expert modules, which the pass groups by
stacking their weights per forward: slower, never stale. (Terms: expert_stacks.py.)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import types
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from graph_moe.expert_stacks import DTensor
from graph_moe.families.common import gated_experts, to_dtype
from graph_moe.stacked_adapters import OWNER as ADAPTERS
from graph_moe.stacked_experts import is_stacked, stack_experts, unstack_experts

_ATTR = "_graph_moe_layout"
log = logging.getLogger("graph_moe")


@dataclasses.dataclass(eq=False)
class Stacked4bit:
    """One projection's bitsandbytes 4-bit weights for every expert, stacked so that ONE dequantize call per
    forward yields the (E, out, in) weights: packed (E, out*in/2, 1) uint8 (each expert's `weight.data` is a view
    into it) and absmax (E, out*in/blocksize) fp32 (views too, unless the experts were double-quantized: then a
    dequantized fp32 copy, 1/8 of the 4-bit bytes). The dequantized stack is a temporary of the forward, never
    persistent bf16 memory."""
    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int, int]
    blocksize: int
    quant_type: str
    dtype: torch.dtype  # the Linear4bit compute dtype

    def dequantize(self) -> torch.Tensor:
        num_experts, out, inner = self.shape
        weights = torch.ops.bitsandbytes.dequantize_4bit(self.packed.view(-1, 1), self.absmax.view(-1), self.blocksize,
                                                         self.quant_type, [num_experts * out, inner], self.dtype)
        return weights.view(num_experts, out, inner)


@dataclasses.dataclass(eq=False)
class ExpertLayout:
    gate_up: torch.Tensor | Stacked4bit | None  # (E, 2I, H); None when `owner` holds it
    down: torch.Tensor | Stacked4bit | None  # (E, H, I)
    linears: list[tuple[nn.Linear, nn.Linear, nn.Linear]]  # (gate, up, down) of each expert, as laid out
    names: tuple[str, str, str]
    act_fn: Callable
    four_bit: bool = False
    adapters: nn.ModuleDict | None = None  # the block's stacked LoRA adapters (stacked_adapters.py), if any
    owner: nn.Module | None = None  # the module whose parameters the stacks are (stacked_experts.py), if any
    valid: bool = True
    # No projection of any expert wrapped by LoRA since the layout was built (a module registered on an expert
    # clears it): every expert's body is then the same computation on its rows of the stacks, with no check per expert.
    no_adapters: bool = False
    # Set for one call (of a model, or of a graph_moe.compile region) by layout_check.verify, which checked in plain
    # Python what `usable_layout` (verified) and `uniform` (verified_uniform) read: the traced forward reads these
    # flags (guarded) instead of 3 x E facts. verified_with_grad: the check counted trainable weights (grad mode on),
    # so it holds in either grad mode. `checked`: what verify compared, and its verdict.
    verified: bool = False
    verified_uniform: bool = False
    verified_with_grad: bool = False
    checked: object = None

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) as (E, out, in) tensors; read once per forward, before the expert loop."""
        if self.owner is not None:  # read from the module: FSDP2 swaps in the all-gathered stacks there
            return self.owner.gate_up, self.owner.down
        if isinstance(self.gate_up, Stacked4bit):
            return self.gate_up.dequantize(), self.down.dequantize()
        return self.gate_up, self.down

    def expert(self, e: int, x: torch.Tensor, experts: list[nn.Module], stacks) -> torch.Tensor:
        """Expert e's MLP, down(act(gate(x)) * up(x)): gate and up in one matmul on the layout, plus the
        LoRA adapters of PEFT-wrapped projections. Linear4bit computes in its compute dtype: cast as it does."""
        # Uniform experts, checked just before this call (layout_check.py): PEFT's state is expert 0's in every
        # expert, so Dynamo tracing the E bodies guards one expert's state, not E
        expert = experts[0 if self.verified_uniform else e]
        gate_up, down = stacks
        gate_name, up_name, down_name = self.names
        gate, up = to_dtype(F.linear(to_dtype(x, gate_up.dtype), gate_up[e]), x.dtype).chunk(2, dim=-1)
        hidden = self.act_fn(self._plus_lora(expert, gate_name, e, x, gate)) * self._plus_lora(expert, up_name, e, x, up)
        down_out = to_dtype(F.linear(to_dtype(hidden, down.dtype), down[e]), hidden.dtype)
        return self._plus_lora(expert, down_name, e, hidden, down_out)

    def uniform(self, experts) -> bool:
        """Whether `expert(e, ...)` is the same computation for every e but for row e of `per_expert_stacks`: each
        projection without LoRA, or with adapters stacked by graph_moe and PEFT state equal to expert 0's."""
        if self.no_adapters:  # read by Dynamo: guarded
            return True
        if self.verified:
            return self.verified_uniform
        return self.same_adapter_states(experts)

    def same_adapter_states(self, experts) -> bool:
        """`uniform` without trusting `no_adapters`: every expert's PEFT state equal to expert 0's, checked."""
        first = [self._adapter_state(experts[0], name) for name in self.names]
        return None not in first and all(self._adapter_state(expert, name) == first[i]
                                          for expert in experts[1:] for i, name in enumerate(self.names))

    def _adapter_state(self, expert: nn.Module, projection: str):
        """What `_plus_lora` reads from this expert's PEFT layer other than stacked rows; None for adapter weights of
        its own (not stacked)."""
        module = expert._modules[projection]
        if "lora_A" not in module._modules:
            return ()
        stacked = self.adapters[projection] if self.adapters is not None and projection in self.adapters else {}
        active = module.__dict__["_active_adapter"]
        state = [module.__dict__.get("cast_input_dtype_enabled", True)]
        for name in [active] if isinstance(active, str) else active:
            if name in stacked:
                dropout = module.lora_dropout[name]
                state.append((name, module.scaling[name], type(dropout), getattr(dropout, "p", None), dropout.training))
            elif name in module.lora_A:
                return None
        return tuple(state)

    def per_expert_stacks(self, stacks) -> list[torch.Tensor]:
        """The tensors `expert(e, ...)` reads row e of: the weight stacks and the stacked adapters."""
        return [*stacks, *([] if self.adapters is None else self.adapters.parameters())]

    def _plus_lora(self, expert: nn.Module, projection: str, e: int, x: torch.Tensor, result: torch.Tensor):
        """What PEFT's lora.Linear.forward adds after its base layer (vanilla LoRA, unmerged). Adapters stacked by
        graph_moe (stacked_adapters.py) are read as row e of their stacks. PEFT's state is read from its fields,
        not its properties: traced by Dynamo, every read is a guard, and there are 3 x E modules."""
        module = expert._modules[projection]
        if "lora_A" not in module._modules:
            return result
        dtype = result.dtype
        # PEFT's 4-bit LoRA casts each adapter's output to the result dtype before adding it (outside autocast).
        cast_each = self.four_bit and not torch.is_autocast_enabled()
        stacked = self.adapters[projection] if self.adapters is not None and projection in self.adapters else {}
        active = module.__dict__["_active_adapter"]
        for name in [active] if isinstance(active, str) else active:
            if name in stacked:
                a, b = stacked[name].lora_A[e], stacked[name].lora_B[e]
            elif name in module.lora_A:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
            else:
                continue
            h = to_dtype(x, a.dtype) if module.__dict__.get("cast_input_dtype_enabled", True) else x
            # The scaling on the r-wide A output, where PEFT scales the B output (out-wide): equal up to rounding,
            # and the backward then feeds B and the base weight one output gradient, not a scaled copy of it
            # (Inductor wrote two, each (rows x hidden): 1.1 GB at Qwen3-30B-A3B, 16384 tokens).
            output = F.linear(F.linear(module.lora_dropout[name](h), a) * module.scaling[name], b)
            result = result + (to_dtype(output, dtype) if cast_each else output)
        return to_dtype(result, dtype)


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit (checked by name: bitsandbytes stays an optional import)."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def base_linear(module: nn.Module) -> nn.Module:
    """The Linear under a PEFT LoRA wrapper, or the module itself (`usable_layout` has the same test inline)."""
    return module._modules.get("base_layer", module) if "lora_A" in module._modules else module


def _plain_lora(module: nn.Module) -> bool:
    """A PEFT lora.Linear (around its `base_layer`) whose forward is base + vanilla LoRA (what
    `ExpertLayout._plus_lora` computes). Reads PEFT's fields rather than its properties (fewer Dynamo guards)."""
    fields = module.__dict__
    return ("base_layer" in module._modules and "lora_A" in module._modules
            and not fields.get("_disable_adapters", True) and not fields.get("merged_adapters", True)
            and not fields.get("lora_variant", True) and not fields.get("fan_in_fan_out", True))


_SLOT = "_graph_moe_slot"  # on each laid-out Linear: 3 * expert + projection (gate, up, down)

# Laid-out Linear -> its layout, to invalidate the layout when a parameter is re-registered on it.
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _on_parameter_registered(module, name, param):
    layout = _OWNERS.get(module)
    if layout is not None and name == "weight":
        layout.valid = False


torch.nn.modules.module.register_module_parameter_registration_hook(_on_parameter_registered)

_EXPERT_OF = "_graph_moe_expert_of"  # on each laid-out expert: its layout (a deepcopy copies both together)


def _on_module_registered(module, name, submodule):
    """A module registered on a laid-out expert (PEFT wrapping a projection after the layout): adapters may differ."""
    layout = module.__dict__.get(_EXPERT_OF)
    if layout is not None:
        layout.no_adapters = False


torch.nn.modules.module.register_module_module_registration_hook(_on_module_registered)


def _why_not(block: nn.Module, names, stacked: bool = False) -> str | None:
    experts = list(gated_experts(block))
    if not experts:
        return "no gated experts"
    dtypes = set()
    for e, expert in enumerate(experts):
        if type(expert) is not type(experts[0]) or not callable(getattr(expert, "act_fn", None)):
            return f"expert {e} is not a gated MLP like expert 0"
        if not _same_activation(expert.act_fn, experts[0].act_fn):
            return f"expert {e}'s act_fn differs from expert 0's (the layout applies one activation to all)"
        if expert._forward_hooks or expert._forward_pre_hooks:
            return f"expert {e} has hooks"
        for name in names:
            module = getattr(expert, name, None)
            if not isinstance(module, nn.Module):
                return f"experts[{e}] has no module {name}"
            lin = base_linear(module)
            if module is not lin and not _plain_lora(module):
                return f"experts[{e}].{name} is a LoRA layer in a state graph_moe does not lay out (merged, DoRA, ...)"
            if type(lin) is not nn.Linear and not is_4bit(lin):
                return f"experts[{e}].{name} is a {type(lin).__name__}, not a plain nn.Linear or bitsandbytes Linear4bit"
            if is_4bit(lin):
                why = _why_not_4bit(lin)
                if why:
                    return f"experts[{e}].{name}: {why}"
                dtypes.add(("4bit", _quant_key(lin), lin.weight.device))
                continue
            if isinstance(lin.weight, DTensor):
                # FSDP2 swaps in all-gathered weights for each forward: no stack of its own to lay out.
                return ("sharded experts (DTensor, FSDP2): the pass stacks the all-gathered weights per forward "
                        "(install(model, stack_experts=True) before fully_shard avoids that)")
            if lin.weight.requires_grad and not stacked:
                return ("trainable experts (stacked per forward, so gradients reach every expert weight; "
                        "install(model, stack_experts=True) avoids the copy)")
            if lin.bias is not None or lin._forward_hooks or lin._forward_pre_hooks:
                return f"experts[{e}].{name} has a bias or hooks"
            dtypes.add((lin.weight.dtype, lin.weight.device, lin.weight.requires_grad))
    if len(dtypes) > 1:
        return "expert weights of mixed dtypes, devices or requires_grad"
    return None


def _same_activation(a, b) -> bool:
    """Two activations that compute the same function: the same object, or modules of one class with equal state
    (transformers makes one ACT2FN instance per expert; their `act` may be a bound method or a functools.partial)."""
    if a is b:
        return True
    if type(a) is not type(b) or not isinstance(a, nn.Module) or a._parameters or a._buffers or a._modules:
        return False

    def state(module):
        return {k: _comparable(v) for k, v in vars(module).items() if not k.startswith("_") and k != "training"}
    return state(a) == state(b)


def _comparable(value):
    if isinstance(value, functools.partial):
        return value.func, value.args, tuple(sorted(value.keywords.items()))
    if inspect.ismethod(value):
        return value.__func__
    return value


def _quant_key(lin) -> tuple:
    state = lin.weight.quant_state
    return state.blocksize, state.quant_type, lin.compute_dtype or state.dtype


def _why_not_4bit(lin) -> str | None:
    state = getattr(lin.weight, "quant_state", None)
    if state is None:
        return "4-bit weight not quantized yet (move the model to its device first)"
    if getattr(state, "packing_format_for_cpu", False):
        return "4-bit weight repacked for the CPU inference kernel"
    if lin.bias is not None or lin._forward_hooks or lin._forward_pre_hooks:
        return "has a bias or hooks"
    if state.nested and state.state2.blocksize != 256:
        return "double quantization with a block size other than 256"
    if lin.weight.numel() * 2 % state.blocksize:
        return "4-bit blocks straddle experts"
    if lin.weight.device.type == "cpu" and lin.in_features % state.blocksize:
        # bitsandbytes' CPU dequantize kernel reads a block's scale by row: over a stack of experts whose rows are not
        # whole blocks it gives other numbers than each expert's own dequantize (measured with bitsandbytes 0.50.2).
        return f"on the CPU, in_features {lin.in_features} is not a multiple of the 4-bit block size {state.blocksize}"
    return None


def _absmax(state) -> torch.Tensor:
    """The fp32 block scales, as bitsandbytes' gemm_4bit computes them from a double-quantized state."""
    if not state.nested:
        return state.absmax
    return torch.ops.bitsandbytes.dequantize_blockwise.default(
        state.absmax, state.state2.absmax, state.state2.code, 256, torch.float32) + state.offset


def _stack_4bit(linears) -> tuple[Stacked4bit, Stacked4bit]:
    """Stack the packed data and block scales of every expert (gate and up back to back), then make each expert's
    weight a view into the stacks, as `_stack_plain` does for plain weights."""
    def stack(parts, shape):
        packed = torch.stack([torch.cat([p.weight.data.view(-1, 1) for p in ps]) for ps in parts])
        absmax = torch.stack([torch.cat([_absmax(p.weight.quant_state) for p in ps]) for ps in parts]).float()
        blocksize, quant_type, dtype = _quant_key(parts[0][0])
        with torch.no_grad():
            for e, ps in enumerate(parts):
                start = scale = 0
                for p in ps:
                    n, blocks = p.weight.data.numel(), p.weight.quant_state.absmax.numel()
                    p.weight.data = packed[e, start:start + n].view(p.weight.data.shape)
                    if not p.weight.quant_state.nested:
                        p.weight.quant_state.absmax = absmax[e, scale:scale + blocks]
                    start, scale = start + n, scale + blocks
        return Stacked4bit(packed, absmax, shape, blocksize, quant_type, dtype)

    num_experts = len(linears)
    (out_gate, hidden), (_, inter) = linears[0][0].weight.quant_state.shape, linears[0][2].weight.quant_state.shape
    return (stack([(g, u) for g, u, _ in linears], (num_experts, 2 * out_gate, hidden)),
            stack([(d,) for _, _, d in linears], (num_experts, hidden, inter)))


def _stack_plain(linears) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up = torch.stack([torch.cat([g.weight, u.weight]) for g, u, _ in linears]).detach()
    down = torch.stack([d.weight for _, _, d in linears]).detach()
    inter = linears[0][0].out_features
    with torch.no_grad():
        for e, (g, u, d) in enumerate(linears):
            g.weight.data = gate_up[e, :inter]
            u.weight.data = gate_up[e, inter:]
            d.weight.data = down[e]
    return gate_up, down


def _build(block: nn.Module, names, stacked: bool = False) -> ExpertLayout:
    experts = gated_experts(block)
    linears = [tuple(base_linear(getattr(x, n)) for n in names) for x in experts]
    four_bit = is_4bit(linears[0][0])
    gate_up, down = (_stack_4bit if four_bit else _stack_plain)(linears)
    # A stack's shape never changes (a new layout makes new tensors): static even under torch.compile(dynamic=True).
    # With a symbolic expert count the pass cannot tell that stack[e] for e < E is the whole stack, and copies the E
    # slices on every forward instead of handing it to the grouped GEMM.
    for stack in (gate_up, down):
        for tensor in (stack.packed, stack.absmax) if four_bit else (stack,):
            torch._dynamo.mark_static(tensor)
    owner = None
    if stacked and not four_bit:
        owner, gate_up, down = stack_experts(block, linears, gate_up, down), None, None
    layout = ExpertLayout(gate_up, down, linears, tuple(names), experts[0].act_fn, four_bit,
                          block._modules.get(ADAPTERS), owner)
    for e, lins in enumerate(linears):
        for i, lin in enumerate(lins):
            _OWNERS[lin] = layout
            lin.__dict__[_SLOT] = 3 * e + i
    layout.no_adapters = all(getattr(expert, name) is lin for expert, lins in zip(experts, linears)
                             for name, lin in zip(names, lins))
    for expert in experts:
        expert.__dict__[_EXPERT_OF] = layout
    return layout


def _apply_then_relayout(self, fn, recurse=True):
    """nn.Module._apply gives every parameter new storage (.to/.cuda/.half); lay the experts out again."""
    type(self)._apply(self, fn, recurse)
    layout = self.__dict__.get(_ATTR)
    if layout is not None and layout.owner is None:  # stacked parameters are converted in place, slices read them
        self.__dict__[_ATTR] = _build(self, layout.names)
    return self


def lay_out(block: nn.Module, names: tuple[str, str, str], stacked: bool = False) -> str | None:
    """Lay out the frozen gated experts of `block` (stacked: frozen or trained, the stacks as the block's parameters,
    stacked_experts.py); returns why not, or None when done."""
    if is_stacked(block):
        unstack_experts(block)
    reason = _why_not(block, names, stacked)
    if reason is None:
        block.__dict__[_ATTR] = _build(block, names, stacked)
        block._apply = types.MethodType(_apply_then_relayout, block)
    return reason


def attach_adapters(block: nn.Module) -> None:
    """Point the block's layout at its stacked LoRA adapters (after `stack_adapters`)."""
    layout = block.__dict__.get(_ATTR)
    if layout is not None:
        layout.adapters = block._modules.get(ADAPTERS)


def remove_layout(block: nn.Module) -> None:
    """Forget the layout; the expert weights stay valid tensors (views keep the stacks alive)."""
    unstack_experts(block)
    block.__dict__.pop(_ATTR, None)
    block.__dict__.pop("_apply", None)
    experts = block._modules.get("experts")
    for expert in experts if isinstance(experts, nn.ModuleList) else ():  # a 5.x experts module has none
        expert.__dict__.pop(_EXPERT_OF, None)


# Dynamo shortcuts that skip tensor guards where a dict did not change (on by default in torch 2.10 and 2.11): the
# first skips every guard below a module whose __dict__ did not change, the second a tensor's guards while the dict
# holding it (a module's _parameters) did not change. A weight's requires_grad_(True) changes no dict.
_TENSOR_GUARD_SHORTCUTS = ("use_recursive_dict_tags_for_guards", "skip_tensor_guards_with_matching_dict_tags")


def keep_tensor_guards() -> None:
    """Turn off Dynamo's shortcuts past tensor guards, so that a laid-out expert weight made trainable after
    compiling is seen where Dynamo checks the layout (where layout_check.py's plain-Python check does not run: a
    model compiled inside another module, a block laid out after install). Without this, torch 2.11 gave that weight
    no gradient."""
    config = torch._dynamo.config
    turned_off = [name for name in _TENSOR_GUARD_SHORTCUTS if getattr(config, name, False)]
    for name in turned_off:
        setattr(config, name, False)
    if turned_off:
        log.info("graph_moe: turned off torch._dynamo.config.%s (it would skip the guard on an expert weight's "
                 "requires_grad)", " and .".join(turned_off))


def layout_of(block: nn.Module) -> ExpertLayout | None:
    """The block's layout, current or not (None when it has none)."""
    return block.__dict__.get(_ATTR)


def usable_layout(block: nn.Module) -> ExpertLayout | None:
    """The block's layout if it is current, else None. Traced by Dynamo: every fact read here is guarded, unless
    layout_check.verify checked them all just before this call (the model's or the region's call), which leaves a flag.
    Written for Dynamo's tracing, which costs per bytecode and most per inlined call, 3 x E times: no helper calls
    but for LoRA wrappers, loop invariants read once. Under no_grad the weights' requires_grad is not read: nothing
    is differentiated, and the weights are views of the stacks (Dynamo wraps every weight it guards: a 128-expert
    layer's no_grad trace 1.40 -> 0.81 s on a 2-core CPU). Dynamo guards the grad mode of every graph."""
    layout = getattr(block, _ATTR, None)
    if layout is None or not layout.valid:
        return None
    if layout.verified and (layout.verified_with_grad or not torch.is_grad_enabled()):
        return layout  # checked in plain Python just before this call (layout_check.py)
    names, slot = layout.names, 0
    skip_grad = layout.four_bit or not torch.is_grad_enabled()
    # zip: the gated experts only (zero experts come after them), without slicing the ModuleList (a new ModuleList,
    # whose construction Dynamo would trace)
    for expert, _ in zip(block.experts, layout.linears):
        modules = expert._modules
        for name in names:
            module = modules[name]
            wrapped = "lora_A" in module._modules
            lin = module._modules.get("base_layer", module) if wrapped else module  # base_linear, inlined
            # The slot mark rather than `lin is layout.linears[e][i]`: Dynamo guards an `is` between two objects
            # with a Python lambda, an integer with a C++ check (3 x E of them on every call), and the same
            # integers in every layer keep one compiled graph for all decoder layers.
            # A stacked layout's slices have no weight parameter (the stacks may train); a plain one's must be frozen.
            # 4-bit weights are integer tensors, which cannot require grad (and a Params4bit's attributes go through
            # __torch_function__: 2 us each, 3 x E of them)
            weight = None if skip_grad else lin._parameters.get("weight")
            if lin.__dict__.get(_SLOT) != slot or (weight is not None and weight.requires_grad):
                return None
            if wrapped and not _plain_lora(module):
                return None
            slot += 1
    return layout
