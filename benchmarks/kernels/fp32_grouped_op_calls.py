"""The float32 LoRA GEMMs of a compiled model, call by call: which `graph_moe::grouped_mm` calls are slow, and what
tiles make them fast. On a GPU (the op's Triton kernels, graph_moe/kernels/grouped_op_cuda.py).

    python benchmarks/kernels/fp32_grouped_op_calls.py --layers 2 --tokens 2048 --json out.json
    python benchmarks/kernels/fp32_grouped_op_calls.py --ab --layers 4 --json out.json

Builds `graph-moe bench step`'s Qwen3-30B-A3B-shaped model with PEFT LoRA r=16 (float32 adapters, PEFT's
default), compiles it with `graph_moe.compile`, and records every call of the op's two kernels in one training step:
shapes, strides, time (each call waited for). Then, for every distinct call, times tile configs on copies of its
operands (same strides, same offsets) against the bytes the call must move at the card's copy bandwidth.

`--ab`: gate's and up's float32 A factors in one GEMM against two, in one process: two copies of the model, one
compiled without the fusion, steps alternated.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

import graph_moe
from graph_moe.tools.bench_layer import cuda_time
from graph_moe.passes import emit_grouped
from graph_moe.kernels import grouped_op_cuda as cuda_op

from graph_moe.tools.bench_step import build_model, train_step


def timed(fn, reps=20):
    """us per call, calls back to back."""
    return 1e3 * cuda_time(fn, warmup=1, iters=reps, back_to_back=True)


def copy_bandwidth():
    x = torch.empty(2**28, device="cuda")
    return 2 * x.numel() * 4 / timed(lambda: x.clone(), 10) / 1e6  # TB/s


def like(t):
    """A copy with the same strides (storage sized to them)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


def record(model, ids):
    calls = []

    def wrap(kind, fn):
        def recorded(*args, **kwargs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            calls.append((kind, [like(a) if isinstance(a, torch.Tensor) else a for a in args],
                          (time.perf_counter() - start) * 1e6))
            return out
        return recorded

    rows, weight_grad = cuda_op.grouped_rows, cuda_op.grouped_weight_grad
    cuda_op.grouped_rows, cuda_op.grouped_weight_grad = wrap("rows", rows), wrap("weight_grad", weight_grad)
    try:
        with graph_moe.capture_settings():
            model.zero_grad(set_to_none=True)
            train_step(model, ids)
    finally:
        cuda_op.grouped_rows, cuda_op.grouped_weight_grad = rows, weight_grad
    return calls


def ab(args, model, ids, steps=10):
    """Training steps of the model compiled with gate's and up's float32 A factors in one GEMM and without (two),
    alternated; and the slowest rows call of one step, timed again, with its count of empty groups."""
    import copy

    before = copy.deepcopy(model)
    graph_moe.compile(model)
    graph_moe.compile(before)
    input_key = emit_grouped._input_key
    with graph_moe.capture_settings():
        train_step(model, ids)
        emit_grouped._input_key = emit_grouped._without_noop_casts  # one A factor per cast node, as before
        try:
            train_step(before, ids)  # compiles without the fusion
        finally:
            emit_grouped._input_key = input_key
        times = {"before": [], "after": []}
        for _ in range(steps):
            for name, m in (("before", before), ("after", model)):
                m.zero_grad(set_to_none=True)
                start = time.perf_counter()
                train_step(m, ids)
                times[name].append(1e3 * (time.perf_counter() - start))
    result = {f"step_ms_{k}": sorted(v)[len(v) // 2] for k, v in times.items()}
    result["steps_ms"] = times
    calls = record(before, ids)
    result["before_rows_weight_shapes"] = sorted({str(tuple(c[1][1].shape)) for c in calls if c[0] == "rows"})
    slowest = max((c for c in calls if c[0] == "rows"), key=lambda c: c[2])
    x, w, offs = slowest[1]
    result["slowest"] = {"signature": [str(s) for s in signature("rows", slowest[1])],
                         "us": timed(lambda: cuda_op.grouped_rows(x, w, offs)),
                         "empty_groups": int((torch.diff(offs, prepend=offs.new_zeros(1)) == 0).sum())}
    return result


def signature(kind, args):
    return (kind,) + tuple((tuple(a.shape), tuple(a.stride()), str(a.dtype)) if isinstance(a, torch.Tensor) else a
                           for a in args)


def moved_bytes(kind, args):
    if kind == "rows":
        x, w, _ = args
        return x.numel() * x.element_size() + x.shape[0] * w.shape[-1] * 4 + w.numel() * w.element_size()
    x, grad, _, groups = args
    return (x.numel() + grad.numel()) * x.element_size() + groups * x.shape[-1] * grad.shape[-1] * 4


def configs(kind, args):
    if kind == "rows":
        x, w, _ = args
        k, n = x.shape[1], w.shape[-1]
        for m, bn, bk, warps, stages in itertools.product((32, 64, 128), (16, 32, 64, 128), (16, 32, 64),
                                                          (4,), (3, 4)):
            if bn <= cuda_op._block(n, 128) and bk <= cuda_op._block(k, 128):
                yield m, bn, bk, warps, stages
    else:
        x, grad, _, _ = args
        k, n = x.shape[1], grad.shape[1]
        for m, bk, bn, warps, stages in itertools.product((32, 64, 128), (16, 32, 64, 128), (16, 32, 64, 128),
                                                          (4,), (3,)):
            if bn <= cuda_op._block(n, 128) and bk <= cuda_op._block(k, 128):
                yield m, bk, bn, warps, stages


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--budget-s", type=float, default=240, help="time for the tile sweep, all calls together")
    p.add_argument("--precisions", nargs="+", default=["tf32x3", "ieee"],
                   help="tl.dot input precisions to sweep (float32 operands)")
    p.add_argument("--ab", action="store_true", help="the A factors' fusion against its absence (see above)")
    p.add_argument("--json")
    args = p.parse_args()
    args.vocab, args.num_experts, args.top_k, args.hidden, args.intermediate = 4096, 128, 8, 2048, 768
    args.device, args.experts, args.qwen3_attention, args.bf16_adapters = "cuda", "lora", True, False
    model = build_model(args)
    ids = torch.randint(0, args.vocab, (1, args.tokens), device="cuda")
    if args.ab:
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
                  "layers": args.layers, **ab(args, model, ids)}
        print(json.dumps({k: v for k, v in result.items() if k != "steps_ms"}), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return
    graph_moe.compile(model)
    with graph_moe.capture_settings():
        train_step(model, ids)  # compile
    calls = record(model, ids)
    bandwidth = copy_bandwidth()
    distinct = {}
    for kind, call_args, us in calls:
        distinct.setdefault(signature(kind, call_args), (kind, call_args, []))[2].append(us)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
              "layers": args.layers, "copy_tb_s": bandwidth, "calls_per_step": len(calls),
              "precision": torch.get_float32_matmul_precision(), "distinct": []}
    precision_of = cuda_op._precision
    deadline = time.perf_counter() + args.budget_s
    per_call = args.budget_s / max(1, len(distinct))
    for sig, (kind, call_args, waited) in sorted(distinct.items(), key=lambda kv: -sum(kv[1][2])):
        run = getattr(cuda_op, "grouped_rows" if kind == "rows" else "grouped_weight_grad")
        default = timed(lambda: run(*call_args))
        entry = {"signature": [str(s) for s in sig], "calls": len(waited), "waited_us": sorted(waited),
                 "default_us": default, "floor_us": moved_bytes(kind, call_args) / bandwidth / 1e6, "sweep": []}
        x, w = call_args[0], call_args[1]
        if kind == "rows":  # one dense float32 GEMM of the same size (cuBLAS), for reference
            entry["dense_mm_us"] = timed(lambda: torch.mm(x, w[0]))
            expected = run(*call_args)
        stop = min(deadline, time.perf_counter() + per_call)
        for precision, config in itertools.product(args.precisions, list(configs(kind, call_args))):
            if time.perf_counter() > stop:
                entry["sweep_cut"] = True
                break
            cuda_op._precision = lambda dtype, p=precision: p
            try:
                us = timed(lambda: run(*call_args, config=config), 10)
                if kind == "rows":
                    err = ((run(*call_args, config=config) - expected).abs().max() / expected.abs().max()).item()
                    assert err < 1e-4, err
                entry["sweep"].append((precision, config, us))
            except Exception as e:  # out of shared memory or registers
                entry["sweep"].append((precision, config, repr(e)[:80]))
            finally:
                cuda_op._precision = precision_of
        for precision in args.precisions:
            ok = [s for s in entry["sweep"] if s[0] == precision and isinstance(s[2], float)]
            entry[f"best_{precision}"] = min(ok, key=lambda s: s[2]) if ok else None
        result["distinct"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k not in ("sweep", "waited_us")}), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
