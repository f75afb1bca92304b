"""transformers 5.x 3D expert weights held in bitsandbytes 4-bit (NF4 by default): `quantize_experts_4bit(model)`.

`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` quantizes a 5.x model's Linear
layers but leaves the 3D experts (`gate_up_proj`, `down_proj`) in bf16: about 58 GB for Qwen3-30B-A3B. This module
quantizes each such stack with bitsandbytes' own `quantize_4bit`, once, over the whole stack (its rows are the experts'
rows one after the other: each expert's weights are whole blocks when out * in is a multiple of the block size, so
that is each expert quantized on its own), and keeps it as two buffers of the experts module:

    <name>_4bit     (E, out * in / 2, 1) uint8    the packed 4-bit codes
    <name>_absmax   (E, out * in / blocksize) fp32  the block scales

The parameter itself is replaced by an `Experts4bit` attribute that says how to read them. graph_moe's loop
(families/transformers5_generic.py) dequantizes the stack once per forward, `dequantize_4bit(packed, absmax, ...)
.view(E, out, in)`, which the pass turns into its 4-bit grouped GEMM (graph_moe/kernels/grouped_mm_4bit.py: a few experts
dequantized at a time, by default), as for 4.x QLoRA experts. PEFT `target_parameters` LoRA goes on top as usual
(before or after quantizing): the adapters train, the 4-bit weights do not.

Saving and loading: `model.state_dict()` / `save_pretrained` hold the two buffers per stack in place of the bf16
parameter. To load, build the model (from its config or the bf16 checkpoint), call `quantize_experts_4bit` with the
same quant_type and blocksize, then `load_state_dict`. The experts then run graph_moe's forward only: install (or
graph_moe.compile) before calling the model; transformers' own forwards read the 3D parameter as a tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref

import torch
from torch import nn

from graph_moe.families import transformers5, transformers5_generic
from graph_moe.layout import Stacked4bit

log = logging.getLogger("graph_moe")


@dataclasses.dataclass(eq=False)
class Experts4bit:
    """Stands for the 3D parameter `name` of an experts module, held in 4-bit in its buffers `<name>_4bit` and
    `<name>_absmax`. `dtype` is the dtype the weights are dequantized to (the parameter's)."""
    owner: weakref.ref
    name: str
    shape: tuple[int, int, int]
    blocksize: int
    quant_type: str
    dtype: torch.dtype

    def stack(self, experts: nn.Module | None = None) -> Stacked4bit:
        experts = experts if experts is not None else self.owner()
        return Stacked4bit(getattr(experts, f"{self.name}_4bit"), getattr(experts, f"{self.name}_absmax"),
                           self.shape, self.blocksize, self.quant_type, self.dtype)

    def dequantize(self, experts: nn.Module | None = None) -> torch.Tensor:
        """The (E, out, in) weights, as bitsandbytes dequantizes them."""
        return self.stack(experts).dequantize()

    def __getitem__(self, e):  # expert e's weights: for a forward other than graph_moe's (slow: dequantizes all)
        return self.dequantize()[e]


def quantize_experts_4bit(model: nn.Module, *, quant_type: str = "nf4", blocksize: int = 64) -> int:
    """Hold the 3D expert weights of every transformers 5.x experts module in `model` in bitsandbytes 4-bit.

    Only stacks that graph_moe's loop reads as `F.linear(x, W[e])` (and whose experts are whole blocks) are quantized;
    the others stay as they are, with a log line saying why. Returns how many stacks were quantized. The weights must
    sit on the device they will run on (bitsandbytes quantizes there). See the module docstring for saving and
    loading."""
    from bitsandbytes.functional import quantize_4bit

    quantized = 0
    for path, experts in model.named_modules():
        if not transformers5.is_5x_experts(experts):
            continue
        why = transformers5_generic.register(type(experts))
        if why is not None:
            log.warning("graph_moe: %s not quantized: %s", path, why)
            continue
        for name in sorted(transformers5_generic.linear_reads(type(experts))):
            weight = experts._parameters.get(name)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
                continue
            num_experts, out, inner = weight.shape
            if out * inner % blocksize:
                log.warning("graph_moe: %s.%s not quantized: its experts are not whole %d-element blocks", path, name,
                            blocksize)
                continue
            with torch.no_grad():
                packed, state = quantize_4bit(weight.detach().reshape(num_experts * out, inner), blocksize=blocksize,
                                              quant_type=quant_type)
            del experts._parameters[name]
            experts.register_buffer(f"{name}_4bit", packed.view(num_experts, -1, 1))
            experts.register_buffer(f"{name}_absmax", state.absmax.float().view(num_experts, -1))
            setattr(experts, name, Experts4bit(weakref.ref(experts), name, (num_experts, out, inner), blocksize,
                                               quant_type, weight.dtype))
            quantized += 1
    log.info("graph_moe: %d expert stack(s) now held in 4-bit (%s)", quantized, quant_type)
    return quantized
