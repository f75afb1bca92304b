"""accelerate: a training loop with `accelerator.backward` and gradient accumulation, the model compiled by
`graph_moe.compile` before `prepare` (the dynamo plugin off), or compiled by accelerate's own dynamo plugin (Inductor,
regional compilation) after `graph_moe.integrations.accelerate.enable`. Eager's losses, the expert loops rewritten."""

import copy

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import TorchDynamoPlugin
from torch._dynamo.utils import counters

import graph_moe
from graph_moe.compile import CAPTURE_SETTINGS
from graph_moe.integrations import accelerate as graph_moe_accelerate
from tiny_models import build


def _accelerator(**kwargs):
    # accelerate keeps its state (the dynamo plugin included) in a process-wide singleton: a fresh one per run
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True, **kwargs)


def _losses(model, accelerator, batches):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for ids in batches:
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses)


def _batches():
    return [torch.randint(0, 64, (2, 8)) for _ in range(4)]


def test_graph_moe_compile_before_prepare_with_accumulation():
    counters.clear()
    model, batches = build("qwen3_moe"), _batches()
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    got = _losses(model, _accelerator(gradient_accumulation_steps=2), batches)
    want = _losses(reference, _accelerator(gradient_accumulation_steps=2), batches)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0


def test_accelerates_regional_dynamo_plugin_after_enable():
    """Inductor (a few seconds on the CPU): the pass runs inside accelerate's own compile."""
    counters.clear()
    torch._dynamo.reset()
    model, batches = build("qwen3_moe"), _batches()
    reference = copy.deepcopy(model)
    saved = {name: getattr(torch._dynamo.config, name) for name in CAPTURE_SETTINGS}
    # caches off: a cached compile would skip the pass and its counters
    with torch._dynamo.config.patch(**saved), torch.compiler.config.patch(force_disable_caches=True), \
            torch._inductor.config.patch(pre_grad_custom_pass=torch._inductor.config.pre_grad_custom_pass):
        graph_moe_accelerate.enable(model)
        assert torch._dynamo.config.capture_scalar_outputs
        plugin = TorchDynamoPlugin(backend="inductor", use_regional_compilation=True)
        got = _losses(model, _accelerator(dynamo_plugin=plugin), batches)
    want = _losses(reference, _accelerator(), batches)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0
    assert torch._dynamo.config.capture_scalar_outputs == saved["capture_scalar_outputs"]  # put back
