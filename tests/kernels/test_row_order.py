"""Rows between token order and expert order (graph_moe/kernels/row_order.py): the tokens' rows move into expert order and the
grouped rows back to (token, slot) order, and no gradient scatter-adds rows (atomics): gathers, or scatters that
read in token order and zero the padding rows, checked in the graphs AOTAutograd gives Inductor and against eager."""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified

import graph_moe
from graph_moe.kernels.row_order import gather_token_rows, unsort_rows
from helpers import assert_close_bf16, assert_grads_close, loss_and_grads
from tiny_models import build


def _aot_graphs(graphs):
    """An inner compiler that runs AOTAutograd and keeps its forward and backward graphs."""
    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return lambda gm, example_inputs, **kw: aot_module_simplified(gm, example_inputs, fw_compiler=keep,
                                                                 bw_compiler=keep)


def _index_puts(graph):
    return [n for n in graph.graph.nodes if n.target in (torch.ops.aten.index_put.default,
                                                         torch.ops.aten.index_put_.default)]


def _rewritten_matches_eager(batch, seq, frozen_experts=False):
    """A Qwen3-MoE compiled through graph_moe (the AOTAutograd graphs kept) against an eager copy: logits and every
    gradient on fresh tokens. Returns the last forward and backward graphs and the gradients."""
    model = build("qwen3_moe", layers=1, experts=8)
    reference = build("qwen3_moe", layers=1, experts=8)
    reference.load_state_dict(model.state_dict())
    if frozen_experts:
        for m in (model, reference):
            for name, p in m.named_parameters():
                p.requires_grad_(".experts." not in name)
    graphs = []
    graph_moe.compile(model, inner=_aot_graphs(graphs))
    ids = torch.randint(0, 64, (batch, seq))
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    logits, grads = loss_and_grads(model, ids)
    assert_close_bf16(logits, ref_logits, "logits")
    assert grads.keys() == ref_grads.keys()
    assert_grads_close(grads, ref_grads)
    return graphs[-2], graphs[-1], grads


def test_rows_move_without_atomics_with_padding():
    """Full fine-tuning (each expert's rows padded to 8, so padding rows exist): logits and every gradient as in
    eager. The rows move into expert order by scatters that zero the padding rows, forward (the tokens' rows) and
    backward (the combine's gradient); no rows are scatter-added (the only scatter-add left is the routing weights'
    gradient, tokens x top-k)."""
    batch, seq, top_k = 2, 9, 2
    forward, backward, _ = _rewritten_matches_eager(batch, seq)
    graphs = (forward, backward)
    row_ops = ("gather_token_rows", "unsort_rows", "add_slots")
    assert not any(op in str(n.target) for g in graphs for n in g.graph.nodes for op in row_ops)  # traced into
    for graph in (forward, backward):  # the rows written in, then the padding rows zeroed
        rows = [n for n in _index_puts(graph) if n.meta["val"].dim() == 2 and n.meta["val"].dtype == torch.bfloat16]
        assert len(rows) == 2 and not any(n.args[3:4] == (True,) or n.kwargs.get("accumulate") for n in rows)
    scatter_adds = [n for n in _index_puts(backward) if n.args[3:4] == (True,) or n.kwargs.get("accumulate")]
    assert [tuple(n.meta["val"].shape)[:2] for n in scatter_adds] == [(batch * seq, top_k)]  # routing_weights[top_x, idx]


def _padding(slots, padding):
    """A random order of `slots` real rows and `padding` padding rows: (perm, slot_of_row, row_of_slot, the
    padding rows listed as the scatters take them, with one unused entry)."""
    perm = torch.randperm(slots + padding)
    slot_of_row = torch.where(perm < slots, perm, slots)  # rows whose perm value >= slots are padding
    row_of_slot = torch.argsort(perm)[:slots]
    listed = torch.cat([torch.nonzero(perm >= slots).flatten(), torch.tensor([slots + padding])])
    return perm, slot_of_row, row_of_slot, listed


@pytest.mark.parametrize("listed", [False, True], ids=["gather", "scatter"])
def test_unsort_rows_gradient_skips_padding_rows(listed):
    """On fresh random rows: the forward gathers rows by slot; the gradient of a row is its slot's gradient, and
    zero for padding rows (slot index past the end), whether gathered or scattered with the padding rows listed.
    opcheck covers the fake kernel and autograd registration."""
    slots, padding = 11, 3
    perm, slot_of_row, row_of_slot, padding_rows = _padding(slots, padding)
    padding_rows = padding_rows if listed else None
    rows = torch.randn(slots + padding, 5, requires_grad=True)
    torch.library.opcheck(unsort_rows, (rows, row_of_slot, slot_of_row, padding_rows))
    out = unsort_rows(rows, row_of_slot, slot_of_row, padding_rows)
    assert torch.equal(out, rows[row_of_slot])
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = torch.zeros_like(rows)
    expected[row_of_slot] = grad
    assert torch.equal(rows.grad, expected)


@pytest.mark.parametrize("listed", [False, True], ids=["gather", "scatter"])
def test_gather_token_rows_gradient_adds_each_tokens_slots(listed):
    """On fresh random tokens: each row reads its token (a padding row some token, or zeros where the padding
    rows are listed); a token's gradient is the sum of its k slots' rows' gradients (padding adds nothing)."""
    tokens, k, padding = 5, 3, 4
    perm, _, row_of_slot, padding_rows = _padding(tokens * k, padding)
    padding_rows = padding_rows if listed else None
    real = perm < tokens * k
    token_of_row = torch.where(real, perm // k, 0)  # padding rows read token 0
    x = torch.randn(tokens, 6, requires_grad=True)
    torch.library.opcheck(gather_token_rows, (x, token_of_row, row_of_slot, k, padding_rows))
    rows = gather_token_rows(x, token_of_row, row_of_slot, k, padding_rows)
    expected_rows = x[token_of_row] * (real.unsqueeze(1) if listed else 1)
    assert torch.equal(rows, expected_rows)
    grad = torch.randn_like(rows)
    rows.backward(grad)
    expected = torch.zeros_like(x).index_add_(0, token_of_row[real], grad[real])
    torch.testing.assert_close(x.grad, expected)


def test_rows_move_by_scatters_without_padding():
    """Frozen experts (no weight gradient groups along the rows, so no padding row): every row is some token's slot,
    so the tokens' rows are written to expert order and the combine's gradient back to it by scatters that read in
    token order, and the slots' gradient stays a view of the tokens' (no select_backward). Logits and every
    gradient (the router's and the attention's need the MoE input's gradient) as in eager, on fresh tokens."""
    batch, seq, top_k = 2, 9, 2
    forward, backward, grads = _rewritten_matches_eager(batch, seq, frozen_experts=True)
    assert any("gate" in n for n in grads)  # the router's gradient needs the MoE input's
    for graph in (forward, backward):  # one scatter of rows each way, not accumulating
        rows = [n for n in _index_puts(graph)
                if n.meta["val"].dim() == 2 and n.meta["val"].shape[0] == batch * seq * top_k]
        assert len(rows) == 1 and not (rows[0].args[3:4] == (True,) or rows[0].kwargs.get("accumulate"))
    assert not any(n.target is torch.ops.aten.select_backward.default for n in backward.graph.nodes)


def test_padded_scatters_with_dynamic_shapes():
    """Full fine-tuning under dynamic=True: the padded row count and the padding rows' list are symbolic; at two
    fresh lengths, logits and every gradient as in eager."""
    model = build("qwen3_moe", layers=1, experts=8)
    reference = build("qwen3_moe", layers=1, experts=8)
    reference.load_state_dict(model.state_dict())
    graph_moe.compile(model, inner="aot_eager", dynamic=True)
    for length in (6, 11):
        ids = torch.randint(0, 64, (2, length))
        ref_logits, ref_grads = loss_and_grads(reference, ids)
        logits, grads = loss_and_grads(model, ids)
        assert_close_bf16(logits, ref_logits, "logits")
        assert_grads_close(grads, ref_grads)
