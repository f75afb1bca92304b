"""One process of the cross-process cache test (tests/test_caches.py): compile a bf16 RangeMoE block,
forward + backward, through the routes named on the command line, and print one JSON line per route.

    TORCHINDUCTOR_CACHE_DIR=/tmp/x python tests/cache_child.py backend pass pass:nofuse

Routes: "backend" = torch.compile(backend=graph_moe.make_backend("inductor")); "pass" = the plain
inductor backend with graph_moe.inductor_options(); "pass:nofuse" = the same with
fuse_projections=False. Each route starts from torch._dynamo.reset() and reports counter deltas.
"""

from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch._functorch.config as functorch_config  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import graph_moe  # noqa: E402
from graph_moe.backend import make_backend  # noqa: E402
from moe_blocks import RangeMoE  # noqa: E402

# The caches must be on, whatever the environment says.
torch.compiler.config.force_disable_caches = False
inductor_config.fx_graph_cache = True
functorch_config.enable_autograd_cache = True


def _snapshot():
    return {"graph_moe": dict(counters["graph_moe"]), "inductor": dict(counters["inductor"]),
            "aot_autograd": dict(counters["aot_autograd"])}


def _delta(before, after, group, key):
    return int(after[group].get(key, 0)) - int(before[group].get(key, 0))


def _pre_grad_timing() -> str:
    try:
        from torch._inductor.codecache import resolve_pre_grad_pass_timing
    except ImportError:  # torch <= 2.11: always before the cache lookup
        return "early"
    with inductor_config.patch(pre_grad_custom_pass=graph_moe.inductor_pass()):
        return resolve_pre_grad_pass_timing()


def _loaded_code_has(text: str, first_module: int) -> bool:
    from torch._inductor.codecache import PyCodeCache

    found = False
    for m in PyCodeCache.modules[first_module:]:
        path = getattr(m, "__file__", None)
        if path and os.path.exists(path):
            with open(path) as f:
                found |= text in f.read()
    return found


def run(route: str) -> dict:
    from torch._inductor.codecache import PyCodeCache

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = RangeMoE(hidden=16, inter=32, num_experts=4, top_k=2).to(torch.bfloat16)
    x = torch.randn(2, 6, 16, dtype=torch.bfloat16)
    seed = torch.randn_like(x)

    x_ref = x.clone().requires_grad_()
    ref = block(x_ref)
    ref.backward(seed)
    ref_grads = [p.grad.clone() for p in block.parameters()] + [x_ref.grad.clone()]
    block.zero_grad(set_to_none=True)

    if route == "backend":
        compiled = torch.compile(block, backend=make_backend("inductor"))
    elif route == "pass":
        compiled = torch.compile(block, options=graph_moe.inductor_options())
    elif route == "pass:nofuse":
        compiled = torch.compile(block, options=graph_moe.inductor_options(fuse_projections=False))
    else:
        raise SystemExit(f"unknown route {route!r}")

    first_module = len(PyCodeCache.modules)
    start = time.perf_counter()
    before = _snapshot()
    x_c = x.clone().requires_grad_()
    with graph_moe.capture_settings():
        out = compiled(x_c)
    out.backward(seed)
    after = _snapshot()
    seconds = time.perf_counter() - start
    grads = [p.grad for p in block.parameters()] + [x_c.grad]

    def close(a, b):
        return a is not None and b is not None and torch.allclose(a.float(), b.float(), atol=3e-2, rtol=3e-2)

    return {
        "route": route,
        "torch": torch.__version__,
        "pre_grad_timing": _pre_grad_timing(),
        "loops_rewritten": _delta(before, after, "graph_moe", "loops_rewritten"),
        "fxgraph_cache_hit": _delta(before, after, "inductor", "fxgraph_cache_hit"),
        "fxgraph_cache_miss": _delta(before, after, "inductor", "fxgraph_cache_miss"),
        "autograd_cache_hit": _delta(before, after, "aot_autograd", "autograd_cache_hit"),
        "autograd_cache_miss": _delta(before, after, "aot_autograd", "autograd_cache_miss"),
        "grouped_mm_in_code": _loaded_code_has("_grouped_mm", first_module),
        "output_equal": close(out, ref),
        "grads_equal": all(close(a, b) for a, b in zip(grads, ref_grads)),
        "max_abs_diff": float((out.float() - ref.float()).abs().max()),
        "seconds": round(seconds, 1),
    }


if __name__ == "__main__":
    for route in sys.argv[1:] or ["backend"]:
        print("GRAPH_MOE_CACHE " + json.dumps(run(route)), flush=True)
