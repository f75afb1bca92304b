"""Skewed routing for benchmarks: router weights set so that expert popularity is unbalanced, as in trained models.

A router with random weights sends every expert about the same number of tokens; trained routers do not. A Qwen3-MoE
router is a Linear without bias, so the skew needs an input coordinate that is positive for every token: one column
of the token embedding is set to a constant, which survives RMSNorm as a large positive coordinate of every router
input. That column of each router's weight then acts as a per-expert bias, fitted layer by layer on the layer's real
input (a pre-hook during one forward) until the share of tokens each expert receives is near the target:

- `zipf`: expert r (of E, by popularity) gets a share of the routed slots proportional to 1 / r**0.5;
- `hot`: one expert is chosen by 30% of the tokens, the others share the rest evenly.
"""

from __future__ import annotations

import torch

KINDS = ("uniform", "zipf", "hot")


def target_shares(kind: str, experts: int, top_k: int) -> torch.Tensor:
    """The fraction of tokens that should pick each expert (sums to top_k)."""
    if kind == "zipf":
        popularity = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 0.5
    elif kind == "hot":
        hot = 0.30 / top_k  # of the routed slots
        popularity = torch.full((experts,), (1 - hot) / (experts - 1), dtype=torch.float64)
        popularity[0] = hot
    else:
        popularity = torch.ones(experts, dtype=torch.float64)
    return top_k * popularity / popularity.sum()


def shares(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The fraction of tokens whose top-k of `logits` (tokens, experts) picks each expert."""
    picked = logits.topk(top_k, dim=-1).indices.flatten()
    return torch.bincount(picked, minlength=logits.shape[-1]).double() / logits.shape[0]


@torch.no_grad()
def skew_routing(model, ids: torch.Tensor, kind: str, *, iterations: int = 300) -> list[dict]:
    """Set the routers of a Qwen3-MoE-style `model` so that `ids` are routed as `kind` says; per layer, the shares
    reached: the hottest expert's share of tokens and its load against the mean."""
    if kind == "uniform":
        return []
    layers = model.get_decoder().layers
    top_k = model.config.num_experts_per_tok
    model.get_input_embeddings().weight[:, 0] = 1.0
    reached = []

    def fit(router, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        weight = router.weight
        target = target_shares(kind, weight.shape[0], top_k).to(x.device)
        logits, column, start = x @ weight.float().T, x[:, :1], weight[:, 0].float()

        def held(change):
            # The column as the router will hold it, in its dtype, minus what it was. Centred: a change common to
            # every expert moves no token's top-k or softmax, and would only make a bf16 column coarser.
            return (start + change - change.mean()).to(weight.dtype).float() - start

        # the change of weight[:, 0], found by sign steps that shrink (as DeepSeek-V3 balances its routing bias)
        change = torch.zeros(weight.shape[0], device=x.device)
        step = logits.std() / column.mean()
        for _ in range(iterations):
            change += step * torch.sign(target - shares(logits + column * held(change), top_k))
            step *= 0.97
        weight[:, 0] += held(change).to(weight.dtype)
        got = shares(x @ weight.float().T, top_k)
        reached.append({"hottest_share": got.max().item(), "hottest_over_mean": (got.max() / got.mean()).item()})

    hooks = [layer.mlp.gate.register_forward_pre_hook(fit) for layer in layers if hasattr(layer.mlp, "gate")]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return reached
