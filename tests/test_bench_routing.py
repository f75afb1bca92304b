"""`graph-moe bench step --routing`: the routers set so that expert popularity is skewed as asked, measured on the
model's own routing of the benchmark's tokens."""

import pytest
import torch

from graph_moe.tools.model_zoo import build_model
from graph_moe.tools.routing import shares, skew_routing, target_shares


def _routed_shares(model, ids):
    """Each layer's share of tokens per expert, from the router's own top-k in a forward."""
    found = []

    def record(router, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        found.append(shares(x.float() @ router.weight.float().T, model.config.num_experts_per_tok))

    hooks = [layer.mlp.gate.register_forward_pre_hook(record) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the routers hold the fitted column
@pytest.mark.parametrize("kind", ["zipf", "hot"])
def test_skewed_routing_reaches_its_target(kind, dtype):
    model = build_model("qwen3_moe", layers=2, experts=32, top_k=4, hidden=64, intermediate=32, vocab=128,
                        dtype=dtype)
    ids = torch.randint(0, 128, (1, 2048))
    reached = skew_routing(model, ids, kind)
    target = target_shares(kind, 32, 4)
    assert len(reached) == 2
    for got in _routed_shares(model, ids):
        assert abs(got.sum().item() - 4) < 1e-6  # every token still picks top_k experts
        assert (got - target).abs().max() < 0.05, (got, target)  # every expert near its target share
    assert skew_routing(model, ids, "uniform") == []
