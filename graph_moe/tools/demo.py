"""The demo: a small MoE model built from a config, eager vs torch.compile vs graph_moe, on this machine."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

import torch

import graph_moe
from graph_moe.tools.model_zoo import build_model
from graph_moe.report import counter_snapshot, reset_counters

log = logging.getLogger("graph_moe")


@dataclasses.dataclass
class DemoResult:
    family: str
    device: str
    tokens: int
    explanation: graph_moe.Explanation
    counters: dict
    max_logit_diff: float  # graph_moe vs eager, same weights
    loss_eager: float
    loss_graph_moe: float
    grad_max_diff: float
    step_ms: dict  # variant -> forward+backward milliseconds
    compile_s: dict  # variant -> first-call seconds

    def __str__(self) -> str:
        lines = [str(self.explanation), "",
                 f"parity with eager ({self.tokens} tokens, bf16): max |logits diff| {self.max_logit_diff:.3g}, "
                 f"loss {self.loss_graph_moe:.5f} vs {self.loss_eager:.5f}, max |grad diff| {self.grad_max_diff:.3g}",
                 f"counters: {self.counters}", "", f"time per training step (forward+backward) on {self.device}:"]
        base = self.step_ms.get("eager")
        for name, ms in self.step_ms.items():
            ratio = f"  ({base / ms:.2f}x eager)" if base and name != "eager" else ""
            first = f", first call {self.compile_s[name]:.1f} s" if name in self.compile_s else ""
            lines.append(f"  {name:<22} {ms:9.2f} ms{ratio}{first}")
        return "\n".join(lines)


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out


def _time(fn, steps, device):
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def run_demo(family="olmoe", *, tokens=256, layers=2, experts=8, top_k=2, hidden=64, intermediate=128, steps=5,
             inner="inductor", compare_plain=True, device=None) -> DemoResult:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(family, layers=layers, experts=experts, top_k=top_k, hidden=hidden,
                        intermediate=intermediate, device=device)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    explanation = graph_moe.explain(model, ids)

    step_ms, compile_s = {}, {}
    log.info("demo: eager %s (%d layers, %d experts, top-%d)", family, layers, experts, top_k)
    eager_out = _step(model, ids)
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    step_ms["eager"] = _time(lambda: _step(model, ids), steps, device)

    if compare_plain:
        plain = copy.deepcopy(model)
        compiled = torch.compile(plain)
        log.info("demo: compiling with torch.compile (%s, unrolled loop) ...", "inductor")
        t0 = time.perf_counter()
        with graph_moe.capture_settings():
            _step(compiled, ids)
            compile_s["torch.compile"] = time.perf_counter() - t0
            step_ms["torch.compile"] = _time(lambda: _step(compiled, ids), steps, device)

    reset_counters()
    ours = copy.deepcopy(model)
    graph_moe.compile(ours, inner=inner)
    log.info("demo: compiling with graph_moe (%s, per decoder layer) ...", inner)
    t0 = time.perf_counter()
    out = _step(ours, ids)
    compile_s["graph_moe"] = time.perf_counter() - t0
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    grad_diff = max((grads[n].float() - g.float()).abs().max().item() for n, g in eager_grads.items())
    step_ms["graph_moe"] = _time(lambda: _step(ours, ids), steps, device)
    return DemoResult(family, device, tokens, explanation, counter_snapshot(),
                      (out.logits.float() - eager_out.logits.float()).abs().max().item(),
                      eager_out.loss.item(), out.loss.item(), grad_diff, step_ms, compile_s)
