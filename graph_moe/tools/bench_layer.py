"""`graph-moe bench layer`: one MoE layer on the GPU, graph_moe against the HF loop and grouped references.

    graph-moe bench layer                                    # Qwen3-30B-A3B shape at 512, 4096, 16384 tokens
    graph-moe bench layer --tokens 4096 --lora --qlora       # LoRA and QLoRA experts beside the frozen ones
    graph-moe bench layer --tokens 1 8 64 512 --mode reduce-overhead   # few tokens, CUDA graphs
    graph-moe bench layer --shapes mixtral-8x7b olmoe-1b-7b --no-loop

Per shape (E, top-k, hidden, intermediate) and token count: forward, and forward+backward with frozen
experts (gradient for the input), in bf16; the roofline from this card's measured GEMM rate and copy
bandwidth. Every variant is compiled first, then timed in interleaved rounds, each call both waited for and issued
back to back (see `cuda_time`). Results: a table on stdout and every number in a JSON record (its first row: the
card's rates and bench_record.run_facts). Each variant's `_peak_gb` is the allocator's peak over one
forward+backward with every variant's weights resident; `graph-moe bench memory` measures each variant alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

from graph_moe.passes import RewriteSettings
from graph_moe.tools.bench_record import run_facts

log = logging.getLogger("graph_moe")

SHAPES = {  # name: (experts, top_k, hidden, intermediate)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "olmoe-1b-7b": (64, 8, 2048, 1024),
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "deepseek-v2-lite": (64, 6, 2048, 1408),
}


ROUNDS = 5  # timing rounds over all variants (run)


def cuda_time(fn, warmup=3, iters=10, back_to_back=False) -> float:
    """ms per call of `fn`: the median of `iters` calls, each waited for (a lone layer: host time counts where the
    host is slower than the GPU); or, `back_to_back`, the mean of `iters` calls issued without waiting, as the
    layers of a deep model are (the host runs ahead while it is faster than the GPU: GPU time)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if back_to_back:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def card_ceilings() -> dict:
    """bf16 GEMM rate (8192^3) and device copy bandwidth (read + write) of this card."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time(lambda: a @ a)
    x = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    copy_ms = cuda_time(lambda: y.copy_(x))
    return {"tflops": 2 * 8192 ** 3 / ms / 1e9, "copy_tbps": 2 * x.numel() / copy_ms / 1e9}


def roofline_ms(shape, tokens, ceilings, backward=False) -> float:
    e, k, h, i = shape
    flops = 6 * tokens * k * h * i * (2 if backward else 1)  # backward for the input only: one more pass
    weight_bytes = 3 * e * h * i * 2
    return max(flops / ceilings["tflops"] / 1e9, weight_bytes / ceilings["copy_tbps"] / 1e9)


def hf_block(shape):
    """transformers 4.x Qwen3MoeSparseMoeBlock (the expert_hit loop) at this shape, random bf16 weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    e, k, h, i = shape
    cfg = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e, num_experts_per_tok=k,
                         norm_topk_prob=True)
    block = Qwen3MoeSparseMoeBlock(cfg).to("cuda", torch.bfloat16)
    for p in block.parameters():
        p.data.normal_(0, 0.02)
    block.requires_grad_(False)
    return block


def benchmark_block(shape_name: str = "qwen3-30b-a3b"):
    """hf_block at a named shape, for `graph-moe bench memory` and the scripts in benchmarks/: Dynamo may recompile as often as their compiled
    variants need (each compiles the same traceable forward, with and without an input gradient)."""
    torch._dynamo.config.recompile_limit = 64
    return hf_block(SHAPES[shape_name])


def graph_moe_and_peer(block) -> dict:
    """graph_moe (frozen experts) and v5-style compiled on `block`, for the scripts in benchmarks/."""
    return {"graph_moe": graph_moe_block(block), "v5c": torch.compile(grouped_reference(block), fullgraph=True)}


def layer_step(fn, x, grad, backward: bool):
    """One call of a compiled layer: a forward alone (no_grad), or a forward+backward with the input's gradient
    reset first, as in training."""
    def step():
        if backward:
            x.grad = None
            fn(x).backward(grad)
        else:
            with torch.no_grad():
                fn(x)

    return step


def grouped_reference(block):
    """The eager grouped MoE as transformers 5.x and torchtitan write it, on weights stacked once."""
    e = block.num_experts
    gate_up = torch.stack([torch.cat([x.gate_proj.weight, x.up_proj.weight]) for x in block.experts])
    down = torch.stack([x.down_proj.weight for x in block.experts])

    def forward(hidden):
        t, h = hidden.shape[-2:] if hidden.dim() == 2 else (hidden.shape[0] * hidden.shape[1], hidden.shape[-1])
        x = hidden.reshape(-1, h)
        probs = F.softmax(F.linear(x, block.gate.weight), dim=1, dtype=torch.float)
        w, ids = torch.topk(probs, block.top_k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        flat = ids.reshape(-1)
        sorted_ids, order = torch.sort(flat, stable=True)
        offs = torch.histc(flat.float(), bins=e, min=0, max=e - 1).cumsum(0).to(torch.int32)
        rows = x[order // block.top_k]
        gu = torch._grouped_mm(rows, gate_up.transpose(-2, -1), offs=offs)
        g, u = gu.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(g) * u, down.transpose(-2, -1), offs=offs)
        y = y * w.reshape(-1)[order, None]
        out = torch.empty_like(y)
        out[order] = y
        return out.view(-1, block.top_k, h).sum(1).reshape(hidden.shape)

    return forward


def with_lora(block, rank=16):
    """A copy of `block` with PEFT LoRA (bf16 adapters) on every expert projection; base weights frozen."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    lora = copy.deepcopy(block)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["gate_proj", "up_proj",
                                                                                   "down_proj"]), lora)
    for name, p in lora.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16).normal_(0, 0.02)
    return lora


def with_nf4(block):
    """A copy of `block` whose expert Linears are bitsandbytes NF4 Linear4bit (bf16 compute), quantized on the GPU."""
    import copy

    import bitsandbytes as bnb

    nf4 = copy.deepcopy(block)
    for expert in nf4.experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(expert, name)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            setattr(expert, name, q.cuda())
    return nf4


def block_variant(kind: str, block):
    """`block` itself ("frozen"), or a copy with LoRA on its experts ("lora") or NF4 experts + LoRA ("qlora")."""
    return {"frozen": lambda: block, "lora": lambda: with_lora(block), "qlora": lambda: with_lora(with_nf4(block))}[kind]()


_CODE_COPIES = itertools.count()


def own_code(fn):
    """`fn` with a code object of its own. Dynamo keeps its compiled entries per code object, most recently hit first:
    variants compiling one function (a closure made per variant) would share them, and each call would evaluate the
    guards of the other variants' entries before reaching its own (host time that no model pays)."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_CODE_COPIES)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def first_output_module(block) -> nn.Module:
    """`block` inside a module whose forward returns the block's first output, with a code object of its own
    (own_code). The router logits are dropped inside the compiled region, as a decoder layer drops them: returned
    from it, their unused gradient would be a zero-filled (tokens x experts) buffer the backward's prologue makes on
    every step (60-80 us of host time at 4096 tokens on an H200 host), which no model pays."""
    def forward(self, hidden):
        return self.block(hidden)[0]

    wrapper = type("FirstOutput", (nn.Module,), {"forward": own_code(forward)})()
    wrapper.block = block
    return wrapper


def graph_moe_block(block, mode=None, layout=True, stack_lora=True, settings=None, inner="inductor"):
    """A copy of `block` compiled as a model is (`torch.compile(model, backend=graph_moe.make_backend(...))`): the
    module compiled is the one given to graph_moe.install, so its layout checks run in plain Python around each call
    (layout_check.watch), not as Dynamo guards. settings: the rewrite's graph_moe.RewriteSettings (default: its
    defaults)."""
    import copy

    import graph_moe

    ours = copy.deepcopy(block)
    model = first_output_module(ours)
    report = graph_moe.install(model, layout=layout, stack_lora=stack_lora)
    log.info("graph_moe.install: %s", "; ".join(sorted({b.weights for b in report.blocks})))
    backend = graph_moe.make_backend(inner, mode=mode, settings=settings)
    compiled = torch.compile(model, backend=backend)

    def forward(hidden):
        if mode in ("reduce-overhead", "max-autotune"):  # CUDA graphs: each call is a new step (outputs reused)
            torch.compiler.cudagraph_mark_step_begin()
        with graph_moe.capture_settings():
            return compiled(hidden)

    forward.module, forward.model = ours, model
    return forward


def unsloth_block(block):
    """A copy of `block` with unsloth-zoo's grouped forward (`enable_grouped_moe`, eager), the peer for 4.x blocks.
    Needs unsloth installed (with transformers 4.57 and bitsandbytes)."""
    import copy

    import unsloth  # noqa: F401  (unsloth-zoo's patches expect unsloth imported)
    from unsloth_zoo.temporary_patches.moe_grouped_modulelist import enable_grouped_moe

    peer = copy.deepcopy(block)
    if not enable_grouped_moe(peer, verbose=False):
        raise RuntimeError("unsloth-zoo's enable_grouped_moe took no block")

    def forward(hidden):
        return peer(hidden)[0]

    forward.module = peer
    return forward


def run(shapes, token_counts, with_loop=True, stacked=False, lora=False, qlora=False, mode=None,
        unsloth=False, only=None, autotune=False, torch_topk=False, on_results=None) -> list[dict]:
    """Every variant's numbers, one row per shape and token count after a row for the card. `on_results` is
    called with the rows so far after each token count (the CLI writes its JSON then: a run stopped early keeps
    what it measured)."""
    from torch._dynamo.utils import counters
    from tqdm import tqdm

    # Every variant compiles the same traceable forward, twice (with and without input grad): more than the default 8.
    torch._dynamo.config.recompile_limit = 64
    ceilings = card_ceilings()
    log.info("card: %s, bf16 GEMM %.0f TFLOP/s, copy %.2f TB/s", torch.cuda.get_device_name(),
             ceilings["tflops"], ceilings["copy_tbps"])
    card = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, **ceilings}
    results = []
    for name in shapes:
        torch._dynamo.reset()  # each shape compiles afresh (the recompile limit counts per code object)
        shape = SHAPES[name]
        block = hf_block(shape)
        variants = {"grouped_eager": grouped_reference(block)}
        variants["grouped_compiled"] = torch.compile(variants["grouped_eager"], fullgraph=True)
        variants["graph_moe"] = graph_moe_block(block, mode)
        if autotune:  # Inductor's Triton GEMM templates (torch._grouped_mm's included) against ATen's, benchmarked
            variants["graph_moe_autotune"] = graph_moe_block(block, "max-autotune-no-cudagraphs")
        if torch_topk:  # ATen's top-k for the router, not graph_moe's kernel (graph_moe/kernels/router_topk.py)
            variants["graph_moe_torch_topk"] = graph_moe_block(block, mode, settings=RewriteSettings(router_topk=False))
        if stacked:
            variants["graph_moe_stacked"] = graph_moe_block(block, layout=False)
        if with_loop:
            variants["hf_loop"] = lambda x: block(x)[0]
        if unsloth:
            variants["unsloth"] = _try(unsloth_block, block)
        lora_block = qlora_block = None
        if lora:
            lora_block = with_lora(block)
            variants["graph_moe_lora"] = graph_moe_block(lora_block, mode)
            if stacked:  # the adapters as PEFT made them: 2 x 3 x E parameters (graph_moe/stacked_adapters.py)
                variants["graph_moe_per_expert_lora"] = graph_moe_block(lora_block, mode, stack_lora=False)
            if with_loop:
                variants["hf_loop_lora"] = lambda x: lora_block(x)[0]
        if qlora:
            qlora_block = with_lora(with_nf4(block))
            # the 4-bit experts dequantized a few at a time (graph_moe/kernels/grouped_mm_4bit.py), and whole stacks at once
            variants["graph_moe_qlora"] = graph_moe_block(qlora_block, mode)
            whole_stacks = RewriteSettings(low_memory_4bit=False)
            variants["graph_moe_qlora_whole_stacks"] = graph_moe_block(qlora_block, mode, settings=whole_stacks)
            if stacked:
                variants["graph_moe_per_expert_qlora"] = graph_moe_block(qlora_block, mode, stack_lora=False)
            if with_loop:
                variants["hf_loop_qlora"] = lambda x: qlora_block(x)[0]
            if unsloth:
                variants["unsloth_qlora"] = _try(unsloth_block, qlora_block)
        variants = {k: v for k, v in variants.items() if v is not None and (not only or k in only)}
        progress = tqdm(total=len(token_counts) * len(variants), desc=name, unit="variant")
        for tokens in token_counts:
            x = torch.randn(1, tokens, shape[2], device="cuda", dtype=torch.bfloat16)
            refs = {"": block(x)[0]}
            if lora:
                refs["lora"] = lora_block(x)[0]
            if qlora:
                refs["qlora"] = qlora_block(x)[0]
            row = {"shape": name, "tokens": tokens, "roofline_fwd_ms": roofline_ms(shape, tokens, ceilings),
                   "roofline_fwd_bwd_ms": roofline_ms(shape, tokens, ceilings, backward=True)}
            steps = {}
            for vname, fn in variants.items():  # compile (first calls), check, peak memory
                counters.clear()
                t0 = time.perf_counter()
                out = fn(x)
                torch.cuda.synchronize()
                row[f"{vname}_first_call_s"] = time.perf_counter() - t0
                ref = refs[reference_kind(vname)]
                row[f"{vname}_max_diff"] = diff = (out.float() - ref.float()).abs().max().item()
                if diff > DIFF_WARNING * ref.float().abs().max().item():
                    log.warning("%s at %d tokens differs from its eager block by %.3g, over %d%% of the largest "
                                "output: check it before trusting its times", vname, tokens, diff, 100 * DIFF_WARNING)
                del out
                modules = [m for m in (lora_block, qlora_block, getattr(fn, "module", None)) if m is not None]
                steps[vname] = _steps(fn, x, [q for m in modules for q in m.parameters() if q.requires_grad])
                steps[vname]["fwd_bwd"]()  # compiles the backward
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                steps[vname]["fwd_bwd"]()
                row[f"{vname}_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
                if vname.startswith("graph_moe"):
                    row[f"{vname}_loops_rewritten"] = int(counters["graph_moe"]["loops_rewritten"])
                progress.update()
            # Timed in interleaved rounds: one variant's time moved by 10-20% between runs on one card kind (clocks,
            # neighbours), so variants timed one after the other would compare different conditions.
            samples: dict[str, list[float]] = {}
            for _ in range(ROUNDS):
                for vname, step in steps.items():
                    for kind, fn_ in step.items():
                        for suffix, b2b in (("", False), ("_back_to_back", True)):
                            samples.setdefault(f"{vname}_{kind}_ms{suffix}", []).append(
                                cuda_time(fn_, warmup=1, iters=5, back_to_back=b2b))
            row.update({key: sorted(v)[len(v) // 2] for key, v in samples.items()})
            for vname in steps:
                log.info("%s %d tokens %s: fwd %.3f ms, fwd+bwd %.3f ms", name, tokens, vname,
                         row[f"{vname}_fwd_ms"], row[f"{vname}_fwd_bwd_ms"])
            results.append(row)
            if on_results is not None:
                on_results([card] + results)
        progress.close()
    return [card] + results


# A variant further than this (times the largest output) from its eager block is suspect. At the Qwen3-30B-A3B shape
# the largest output is ~0.85 and bf16 implementations on the same router differ by 0.006-0.012; a bf16 layer against
# its fp32 self, whose routing flips near ties, by 12% (CPU, 1024 tokens); NF4 + LoRA against the frozen bf16 block
# (a check once run against the wrong block) by ~25%.
DIFF_WARNING = 0.10


def reference_kind(variant: str) -> str:
    """Which block a variant's output is checked against: "qlora" (NF4 experts + LoRA), "lora", or "" (frozen bf16).
    Read from anywhere in the name: a suffix like `_whole_stacks` follows the kind."""
    return "qlora" if "qlora" in variant else "lora" if "lora" in variant else ""


def _steps(fn, x, trainable) -> dict:
    """A forward (no input gradient) and a forward+backward of `fn` on `x`, gradients reset as in training."""
    xg = x.clone().requires_grad_()
    grad = torch.randn_like(x)

    def fwd_bwd():
        xg.grad = None
        for q in trainable:  # as optimizer.zero_grad(set_to_none=True) does in a training step
            q.grad = None
        fn(xg).backward(grad)

    return {"fwd": lambda: fn(x), "fwd_bwd": fwd_bwd}


def _try(make, block):
    """A peer variant, or None (logged) where it cannot run here."""
    try:
        return make(block)
    except Exception as e:  # an optional peer: the rest of the benchmark goes on
        log.warning("skipping %s: %s: %s", make.__name__, type(e).__name__, e)
        return None


def table(results) -> str:
    head, rows = results[0], results[1:]
    lines = [f"{head['card']}, torch {head['torch']}, bf16 GEMM {head['tflops']:.0f} TFLOP/s, "
             f"copy {head['copy_tbps']:.2f} TB/s; ms per MoE layer, forward / forward+backward (frozen experts)"]
    for suffix, title in (("", "each call waited for"), ("_back_to_back", "calls issued back to back, as a deep model's layers")):
        if not all(f"{v}_fwd_ms{suffix}" in rows[0] for v in _variants(rows)):
            continue
        lines += ["", title,
                  "| shape | tokens | roofline | " + " | ".join(v for v in _variants(rows)) + " |",
                  "|---|---|---|" + "---|" * len(_variants(rows))]
        for r in rows:
            cells = [f"{r[f'{v}_fwd_ms{suffix}']:.2f} / {r[f'{v}_fwd_bwd_ms{suffix}']:.2f}" for v in _variants(rows)]
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['roofline_fwd_ms']:.2f} / {r['roofline_fwd_bwd_ms']:.2f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def _variants(rows):
    return [k[:-7] for k in rows[0] if k.endswith("_fwd_ms") and not k.startswith("roofline")]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="graph-moe bench layer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b"], choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 4096, 16384])
    p.add_argument("--no-loop", action="store_true", help="skip the HF loop (slow)")
    p.add_argument("--stacked", action="store_true", help="also graph_moe without the grouped weight layout")
    p.add_argument("--lora", action="store_true", help="also LoRA r=16 on every expert projection (PEFT)")
    p.add_argument("--qlora", action="store_true",
                   help="also NF4 4-bit experts + LoRA r=16 (bitsandbytes + PEFT), graph_moe with the default "
                        "low_memory_4bit=True and with False (whole stacks dequantized at once)")
    p.add_argument("--unsloth", action="store_true", help="also unsloth-zoo's grouped forward (needs unsloth)")
    p.add_argument("--only", nargs="+", default=None, help="run only these variants (names as in the table)")
    p.add_argument("--mode", default=None, help="torch.compile mode for the graph_moe variants (reduce-overhead: CUDA graphs)")
    p.add_argument("--autotune", action="store_true",
                   help="also graph_moe with mode='max-autotune-no-cudagraphs' (Triton GEMM templates; slow compile)")
    p.add_argument("--torch-topk", action="store_true",
                   help="also graph_moe with router_topk=False (ATen's top-k for the router, not graph_moe's kernel)")
    p.add_argument("--json", default="bench_results.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("the benchmark needs a CUDA GPU")
    facts = run_facts("layer", argv, "cuda")

    def write(results):
        with open(args.json, "w") as f:
            json.dump([{**results[0], **facts}, *results[1:]], f, indent=1)

    results = run(args.shapes, args.tokens, with_loop=not args.no_loop, stacked=args.stacked, lora=args.lora,
                  qlora=args.qlora, mode=args.mode, unsloth=args.unsloth, only=args.only, autotune=args.autotune,
                  torch_topk=args.torch_topk, on_results=write)
    write(results)
    diffs = {}
    for row in results[1:]:
        for k, v in row.items():
            if k.endswith("_max_diff"):
                diffs[k] = max(v, diffs.get(k, 0.0))
    log.info("largest |output - HF loop| per variant: %s", {k: f"{v:.3g}" for k, v in diffs.items()})
    print(table(results))
    return 0
