"""Forwards derived from a transformers 4.x block's own expert-hit loop (graph_moe/families/transformers4_generic.py),
for classes without a hand-written family: bit-identical to the class forward in eager, rewritten into grouped GEMMs
under graph_moe.compile with logits and gradients equal to eager; a loop changed in a way the derivation cannot prove
harmless is refused with the reason, and the block left as it is."""

from __future__ import annotations

import inspect
import linecache
import textwrap

import pytest
import torch
import transformers
from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock
from transformers.models.qwen3_moe import modeling_qwen3_moe
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import graph_moe
from graph_moe.families import transformers4_generic, unsupported_reason
from helpers import check_model_rewritten
from tiny_models import build


def _ernie_block(top_k):
    config = transformers.Ernie4_5_MoeConfig(hidden_size=32, moe_intermediate_size=32, moe_num_experts=8,
                                             moe_k=top_k, moe_num_shared_experts=1)
    block = Ernie4_5_MoeSparseMoeBlock(config)
    with torch.no_grad():  # a correction bias that changes which experts win, as a trained one does
        block.moe_statics.e_score_correction_bias.normal_(0, 0.01)
    return block


def _qwen3_block(cls=Qwen3MoeSparseMoeBlock, top_k=2):
    config = transformers.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=32, num_experts=4,
                                         num_experts_per_tok=top_k, norm_topk_prob=True)
    return cls(config)


def _outputs_and_grads(forward, block, x):
    """The block's outputs and the gradients of its parameters and input (zeros where none: the derived loop calls
    every expert, an expert without tokens on no rows)."""
    block.zero_grad()
    x = x.detach().requires_grad_()
    out, logits = forward(block, x)
    (out.square().sum() + logits.sum()).backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in block.parameters()]
    return [out, logits, x.grad, *grads]


def _assert_derived_bit_identical(block, top_k, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(2, 3 if top_k == 1 else 9, 32)  # few tokens: some experts get none
    derived = transformers4_generic.block_forward  # the derived loop, as install runs it
    reference = _outputs_and_grads(type(block).forward, block, x)
    for got, want in zip(_outputs_and_grads(derived, block, x), reference, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("top_k", [1, 2])
def test_ernie_derived_forward_is_the_class_forward_bit_for_bit(top_k):
    block = _ernie_block(top_k)
    assert unsupported_reason(block) is None
    _assert_derived_bit_identical(block, top_k)
    # Frozen experts: install lays them out (graph_moe/layout.py) and the derived loop reads expert e from the stacks.
    block.requires_grad_(False)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        reference = block(x)
        assert graph_moe.install(block).blocks[0].weights == "grouped layout"
        assert all(torch.equal(a, b) for a, b in zip(block(x), reference, strict=True))


def test_qwen3_derived_forward_rewritten_and_equal():
    """Qwen3-MoE's own forward, derived (its class renamed, so no hand-written family matches), compiled: two loops
    of grouped GEMMs, logits and gradients equal to eager."""
    model = build("qwen3_moe")
    renamed = type("RenamedQwen3MoeBlock", (Qwen3MoeSparseMoeBlock,), {})
    for layer in model.model.layers:
        layer.mlp.__class__ = renamed
    check_model_rewritten(model, blocks=2, seq_len=16)
    report = model._graph_moe_install_report
    assert {(b.class_name, b.form) for b in report.blocks} == {("RenamedQwen3MoeBlock", "H")}, str(report)
    assert all(layer.mlp.forward.__func__ is transformers4_generic.block_forward for layer in model.model.layers)


def _edited(*edits: tuple[str, str]) -> type:
    """A subclass of Qwen3MoeSparseMoeBlock whose forward is transformers' own with each line `old` made `new` (lines
    at the old one's indent; "" drops it)."""
    lines = textwrap.dedent(inspect.getsource(Qwen3MoeSparseMoeBlock.forward)).splitlines(True)
    for old, new in edits:
        (at,) = [i for i, line in enumerate(lines) if line.strip() == old]
        indent = lines[at][:len(lines[at]) - len(lines[at].lstrip())]
        lines[at:at + 1] = [indent + line + "\n" for line in new.splitlines()]
    source = "".join(lines)
    filename = f"<tests: Qwen3MoeSparseMoeBlock.forward edited {edits!r}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {}
    exec(compile(source, filename, "exec"), vars(modeling_qwen3_moe), namespace)
    return type("EditedQwen3MoeBlock", (Qwen3MoeSparseMoeBlock,), {"forward": namespace["forward"]})


_HIT = "expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()"
_LAYER = "expert_layer = self.experts[expert_idx]"
_WHERE = "idx, top_x = torch.where(expert_mask[expert_idx].squeeze(0))"
_STATE = "current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)"
_EXPERT = "current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]"
_AFTER = "final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)"


@pytest.mark.parametrize("edits", [
    [(_LAYER, ""), (_EXPERT, _EXPERT.replace("expert_layer", "self.experts[expert_idx]"))],
    [(_WHERE, _WHERE + "\nif top_x.shape[0] == 0:\n    continue")],  # transformers' older empty-expert guard
    [(_HIT, _HIT + ".squeeze(-1)"), (_WHERE, _WHERE.replace(".squeeze(0)", ""))],  # 0-d indices: no squeeze
], ids=["module-called-where-read", "empty-guard", "squeezed-hit"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_variants_of_the_loop_are_derived(edits, top_k):
    block = _qwen3_block(_edited(*edits), top_k)
    assert unsupported_reason(block) is None, unsupported_reason(block)
    _assert_derived_bit_identical(block, top_k)


@pytest.mark.parametrize("edits, why", [
    ([(_STATE, _STATE + "\ncurrent_state.mul_(1.0)")], "the loop body holds `current_state.mul_(1.0)`"),
    ([(_STATE, _STATE + " + 0 * expert_idx")],
     "uses the expert index expert_idx other than in expert_mask[expert_idx] and self.experts[expert_idx]"),
    ([(_AFTER, _AFTER + " + 0 * current_hidden_states.sum()")],
     "current_hidden_states, assigned in the loop, is read outside it"),
    ([(_STATE, _STATE + " + final_hidden_states[top_x]")], "reads final_hidden_states besides adding into it"),
    ([(_EXPERT, _EXPERT + " + 0 * expert_layer(current_state)")],
     "the expert module self.experts[expert_idx] is not used once, as expert_layer(<x>)"),
], ids=["in-place", "index-read", "read-after-loop", "accumulator-read", "module-twice"])
def test_changed_loops_are_refused_with_the_reason(edits, why):
    torch.manual_seed(0)
    block = _qwen3_block(_edited(*edits))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        reference = block(x)
        (entry,) = graph_moe.install(block).blocks
        out = block(x)
    assert entry.status.startswith("not supported: EditedQwen3MoeBlock's expert loop cannot become a range loop: ")
    assert why in entry.status, entry.status
    assert "forward" not in block.__dict__
    assert all(torch.equal(a, b) for a, b in zip(out, reference, strict=True))


def test_qwen3_next_model_rewritten_and_equal():
    """Qwen3-Next (4.57) has no hand-written family: its block's loop is derived. Full-attention layers only: the
    torch fallback of its linear attention fails in backward under torch.compile with or without graph_moe."""
    config = transformers.Qwen3NextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_experts=4, num_experts_per_tok=2, layer_types=["full_attention", "full_attention"])
    torch.manual_seed(0)
    model = transformers.Qwen3NextForCausalLM(config).to(torch.bfloat16)
    assert all(unsupported_reason(layer.mlp) is None for layer in model.model.layers)
    check_model_rewritten(model, blocks=2)
