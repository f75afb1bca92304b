"""graph_moe and torch.compile's caches: the Inductor pre-grad pass form and its uuid, two processes
sharing one Inductor cache, dynamic-shape recompiles, weight updates after compile, and guard-driven
recompiles (train/eval, requires_grad). CPU, bf16 RangeMoE blocks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

import graph_moe
import importlib

gip = importlib.import_module("graph_moe.inductor_pass")  # the module (graph_moe.inductor_pass is the function)
from graph_moe.backend import make_backend
from moe_blocks import RangeMoE

HERE = os.path.dirname(os.path.abspath(__file__))
BF16 = torch.bfloat16


def assert_close(a, b, what=""):
    torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2, msg=lambda m: f"{what}: {m}")


def block(seed=0, **kw):
    torch.manual_seed(seed)
    return RangeMoE(**{"hidden": 16, "inter": 32, "num_experts": 4, "top_k": 2, **kw}).to(BF16)


def rewritten() -> int:
    return int(counters["graph_moe"]["loops_rewritten"])


class Counting:
    """A graph_moe backend that counts its invocations and the example inputs each one got."""

    def __init__(self, inner="aot_eager"):
        self.calls: list[list] = []

        def run_inner(gm, example_inputs, **kw):
            self.calls.append(list(example_inputs))
            if inner == "inductor":
                from torch._inductor.compile_fx import compile_fx
                return compile_fx(gm, example_inputs)
            return lookup_backend(inner)(gm, example_inputs)

        self.backend = make_backend(run_inner)


class Recording(CustomGraphPass):
    """A user's own pre-grad pass: records the graphs it saw (and whether ours ran before it)."""

    def __init__(self, tag="user"):
        self.tag, self.seen = tag, []

    def __call__(self, graph):
        self.seen.append(sum(1 for n in graph.nodes if n.op == "call_function"
                             and getattr(n.target, "__name__", "") == "_grouped_mm"))

    def uuid(self):
        return f"recording-{self.tag}"


@pytest.fixture
def fresh_inductor_cache(tmp_path):
    """A private, empty Inductor cache (FX graph + AOTAutograd + kernels) for one test."""
    with torch._inductor.utils.fresh_cache(dir=str(tmp_path)):
        yield


# ---------------------------------------------------------------------------------------------
# a. The Inductor pass form


def test_pass_with_plain_inductor_rewrites_and_matches_eager(fresh_inductor_cache):
    """torch.compile(options=inductor_options()): the stock inductor backend runs our pre-grad pass,
    then the user's pass that config held; forward and backward equal eager."""
    m = block()
    x = torch.randn(2, 6, 16, dtype=BF16)
    seed = torch.randn_like(x)
    x_ref = x.clone().requires_grad_()
    ref = m(x_ref)
    ref.backward(seed)
    ref_grads = [p.grad.clone() for p in m.parameters()] + [x_ref.grad.clone()]
    m.zero_grad(set_to_none=True)

    user = Recording()
    with torch._inductor.config.patch(pre_grad_custom_pass=user):
        options = gip.inductor_options()
    ours = options["pre_grad_custom_pass"]
    assert isinstance(ours, gip.GraphMoePass) and ours.then == (user,)

    compiled = torch.compile(m, options=options)  # backend="inductor", not graph_moe's
    x_c = x.clone().requires_grad_()
    with graph_moe.capture_settings():
        out = compiled(x_c)
    out.backward(seed)

    assert rewritten() == 1, dict(counters["graph_moe"])
    assert len(user.seen) == 1 and user.seen[0] > 0, "the user's pass must run once, after ours, on the rewritten graph"
    assert_close(out, ref, "output")
    for i, (a, b) in enumerate(zip([p.grad for p in m.parameters()] + [x_c.grad], ref_grads)):
        assert_close(a, b, f"grad {i}")


def test_pass_called_directly_on_a_dynamo_graph():
    """The hook's contract: a torch.fx.Graph owned by the Dynamo GraphModule, rewritten in place,
    then each composed pass in order."""
    m = block(seed=1)
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    x = torch.randn(3, 5, 16, dtype=BF16)
    torch.compile(m, backend=capture)(x)
    (gm, example_inputs), = captured

    order = []
    first, second = Recording("1"), Recording("2")
    p = gip.inductor_pass(then=[first, lambda g: order.append("plain"), second],
                          on_reports=lambda r: order.append(("reports", len(r))))
    p(gm.graph)
    assert rewritten() == 1
    assert len(first.seen) == 1 and first.seen[0] > 0 and second.seen == first.seen
    assert order == [("reports", 1), "plain"]
    assert "_grouped_mm" in gm.code, "the owning GraphModule must be recompiled"
    with torch.no_grad():
        assert_close(gm(*example_inputs)[0], m(x), "rewritten graph")

    p(gm.graph)  # idempotent: nothing left to rewrite
    assert rewritten() == 1


def test_uuid_follows_settings_code_and_composed_pass(tmp_path, monkeypatch):
    a, b = gip.inductor_pass(), gip.inductor_pass()
    original = a.uuid()
    assert original and b.uuid() == original
    assert gip.inductor_pass(fuse_projections=False).uuid() != a.uuid()
    assert gip.inductor_pass(router_topk=False).uuid() != a.uuid()
    assert gip.inductor_pass(low_memory_4bit=False).uuid() != a.uuid()

    # The composed pass's uuid is folded in; a pass without one makes ours None (early timing).
    assert gip.inductor_pass(then=Recording("x")).uuid() not in (None, a.uuid())
    assert gip.inductor_pass(then=Recording("x")).uuid() != gip.inductor_pass(then=Recording("y")).uuid()
    assert gip.inductor_pass(then=lambda g: None).uuid() is None

    # Hashed files: every module of graph_moe.passes and graph_moe.kernels, and this pass's own file.
    files = gip._source_files()
    expected = {os.path.join(folder, f) for folder in (os.path.dirname(gip._passes_pkg.__file__),
                                                       os.path.dirname(gip._kernels_pkg.__file__))
                for f in os.listdir(folder) if f.endswith(".py")}
    assert expected <= set(files) and files[-1] == os.path.abspath(gip.__file__)

    # A change to any of them changes the uuid.
    copies = []
    for i, f in enumerate(files):
        dst = tmp_path / f"{i}_{os.path.basename(f)}"
        shutil.copyfile(f, dst)
        copies.append(str(dst))
    monkeypatch.setattr(gip, "_source_files", lambda: tuple(copies))
    assert gip.inductor_pass().uuid() == original
    with open(copies[0], "a") as f:
        f.write("\n# edited\n")
    # get_hash_for_files is lru_cached on the paths: in one process the first hash stands (the code
    # was imported once too); a new process reads the files again.
    get_hash_for_files.cache_clear()
    assert gip.inductor_pass().uuid() != original


def test_options_compose_with_config_and_do_not_stack():
    user = Recording()
    with torch._inductor.config.patch(pre_grad_custom_pass=None):
        assert gip.inductor_options()["pre_grad_custom_pass"].then == ()
    with torch._inductor.config.patch(pre_grad_custom_pass=user):
        assert gip.inductor_options()["pre_grad_custom_pass"].then == (user,)
    # Our own pass already in the config is replaced, not run twice.
    with torch._inductor.config.patch(pre_grad_custom_pass=gip.inductor_pass(then=user)):
        assert gip.inductor_options()["pre_grad_custom_pass"].then == (user,)
    # An explicit then= wins over the config.
    other = Recording("other")
    with torch._inductor.config.patch(pre_grad_custom_pass=user):
        assert gip.inductor_options(then=other)["pre_grad_custom_pass"].then == (other,)


def test_pre_grad_timing_follows_uuid():
    """torch >= 2.12: a uuid'd pre-grad pass runs late (only on a cache miss); without one, early."""
    codecache = pytest.importorskip("torch._inductor.codecache")
    resolve = getattr(codecache, "resolve_pre_grad_pass_timing", None)
    if resolve is None:
        pytest.skip("torch <= 2.11 always runs pre-grad passes before the cache lookup")
    with torch._inductor.config.patch(pre_grad_custom_pass=gip.inductor_pass()):
        assert resolve() == "late"
    with torch._inductor.config.patch(pre_grad_custom_pass=gip.inductor_pass(then=lambda g: None)):
        assert resolve() == "early"


# ---------------------------------------------------------------------------------------------
# b. Two processes, one Inductor cache


def _child(cache_dir, *routes) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                        "TORCHINDUCTOR_AUTOGRAD_CACHE", "TORCH_COMPILE_DEBUG")}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "cache_child.py"), *routes],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
             if line.startswith("GRAPH_MOE_CACHE ")]
    return {f["route"]: f for f in facts}


def test_second_process_hits_the_fx_graph_cache(tmp_path):
    cache = tmp_path / "inductor"
    cold = _child(cache, "backend", "pass")
    warm = _child(cache, "backend", "pass", "pass:nofuse")

    for route in ("backend", "pass"):
        assert cold[route]["fxgraph_cache_miss"] >= 1 and cold[route]["loops_rewritten"] == 1, cold[route]
    # The backend rewrites before any cache lookup: counted again, then the FX-graph cache hits.
    b = warm["backend"]
    assert b["fxgraph_cache_hit"] >= 1 and b["fxgraph_cache_miss"] == 0, b
    assert b["loops_rewritten"] == 1, b
    assert b["output_equal"] and b["grads_equal"] and b["grouped_mm_in_code"], b
    # The pass form hits too; on torch >= 2.12 the pass is not even run on a hit (the cached
    # artifact holds the rewrite), on 2.11 it runs before the lookup.
    p = warm["pass"]
    assert p["fxgraph_cache_hit"] >= 1 and p["fxgraph_cache_miss"] == 0, p
    assert p["loops_rewritten"] == (0 if p["pre_grad_timing"] == "late" else 1), p
    assert p["output_equal"] and p["grads_equal"] and p["grouped_mm_in_code"], p
    # Other settings, other uuid: a miss, and the pass runs.
    n = warm["pass:nofuse"]
    if n["pre_grad_timing"] == "late":
        assert n["autograd_cache_miss"] >= 1 and n["fxgraph_cache_miss"] >= 1, n
    assert n["loops_rewritten"] == 1 and n["output_equal"] and n["grads_equal"], n


# ---------------------------------------------------------------------------------------------
# c. Dynamic shapes


def test_six_sequence_lengths_compile_at_most_twice():
    m = block(seed=2)
    counting = Counting("aot_eager")
    compiled = torch.compile(m, backend=counting.backend)
    with graph_moe.capture_settings():
        for t in (8, 12, 16, 5, 24, 33):
            x = torch.randn(1, t, 16, dtype=BF16)
            assert_close(compiled(x), m(x), f"{t} tokens")
    assert len(counting.calls) <= 2, [[type(e).__name__ for e in c] for c in counting.calls]
    assert rewritten() == len(counting.calls)
    if len(counting.calls) == 2:  # the second compile is the dynamic one
        assert any(isinstance(e, torch.SymInt) for e in counting.calls[1])


# ---------------------------------------------------------------------------------------------
# d. Weights changed after compile


def test_weight_updates_after_compile_are_seen(fresh_inductor_cache):
    m = block(seed=3)
    counting = Counting("inductor")
    compiled = torch.compile(m, backend=counting.backend)
    probe = torch.randn(2, 7, 16, dtype=BF16)

    def check(what):
        x = torch.randn(2, 7, 16, dtype=BF16)
        with torch.no_grad(), graph_moe.capture_settings():
            assert_close(compiled(x), m(x), what)
            return compiled(probe)

    before = check("first call")

    with torch.no_grad():
        for expert in m.experts:
            expert.up_proj.weight.mul_(2)
    after_mul = check("after in-place mul_ on the expert weights")
    assert not torch.equal(after_mul, before)

    m.load_state_dict(block(seed=4).state_dict())
    after_load = check("after load_state_dict")
    assert not torch.equal(after_load, after_mul)

    opt = torch.optim.SGD(m.experts.parameters(), lr=0.5)
    x = torch.randn(2, 7, 16, dtype=BF16)
    m(x).float().pow(2).mean().backward()  # eager grads; the step updates the weights in place
    opt.step()
    opt.zero_grad(set_to_none=True)
    after_step = check("after an SGD step on the experts")
    assert not torch.equal(after_step, after_load)

    assert m.to(BF16) is m
    assert torch.equal(check("after .to(bfloat16)"), after_step)

    assert len(counting.calls) == 1, "weight updates must not need a recompile"
    assert rewritten() == 1


# ---------------------------------------------------------------------------------------------
# e. Guard-driven recompiles go through the backend again


class ModeAwareMoE(RangeMoE):
    """Reads self.training before the loop, as Mixtral's router jitter does: Dynamo guards on it."""

    jitter_noise = 0.0

    def forward(self, hidden_states):
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return super().forward(hidden_states)


def test_train_eval_and_requires_grad_recompiles_are_rewritten():
    torch.manual_seed(5)
    m = ModeAwareMoE(hidden=16, inter=32, num_experts=4, top_k=2).to(BF16)
    counting = Counting("aot_eager")
    compiled = torch.compile(m, backend=counting.backend)
    x = torch.randn(2, 6, 16, dtype=BF16)

    def step(what, grad=True):
        with graph_moe.capture_settings(), torch.set_grad_enabled(grad):
            assert_close(compiled(x), m(x), what)
        assert rewritten() == len(counting.calls), (what, dict(counters["graph_moe"]), len(counting.calls))
        return len(counting.calls)

    assert step("train") == 1
    m.eval()
    assert step("eval") == 2, "train -> eval must recompile"
    m.train()
    assert step("train again") == 2, "the train entry is reused"
    assert step("no_grad", grad=False) == 3, "grad mode is guarded: a recompile"

    for p in m.experts.parameters():
        p.requires_grad_(False)
    calls = step("frozen experts")
    # torch 2.13 guards on a parameter's requires_grad and recompiles; 2.11 reuses the entry (its
    # autograd wrapper drops the frozen weights' grads at run time). Either way: rewritten, and correct.
    if torch.__version__ >= "2.13":
        assert calls == 4, "requires_grad toggling must recompile"
    else:
        assert calls in (3, 4)

    seed = torch.randn_like(x)
    x_ref, x_c = x.clone().requires_grad_(), x.clone().requires_grad_()
    m(x_ref).backward(seed)
    ref_gate, ref_x = m.gate.weight.grad.clone(), x_ref.grad.clone()
    m.zero_grad(set_to_none=True)
    with graph_moe.capture_settings():
        compiled(x_c).backward(seed)
    assert all(p.grad is None for p in m.experts.parameters())
    assert_close(m.gate.weight.grad, ref_gate, "gate grad")
    assert_close(x_c.grad, ref_x, "input grad")
    assert rewritten() == len(counting.calls) >= calls
