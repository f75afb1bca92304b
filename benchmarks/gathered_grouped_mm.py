"""Experiment (session 9): a Triton grouped GEMM that gathers its rows as it loads them, against the gather then
torch._grouped_mm, on a GPU. Not used by the pass: it saved too little (benchmarks/RESULTS.md, "Tried and dropped").

    python benchmarks/gathered_grouped_mm.py --tokens 4096 16384 --json out.json

The grouped graph's first GEMM reads x[token_of_row]: each token's row k times, sorted by expert. Written out, the
gather writes and reads (tokens * k, hidden) once more than the GEMM needs. Here each tile loads its rows straight
from x through token_of_row:

    gathered(x, token_of_row, w, offs) == torch._grouped_mm(x[token_of_row], w, offs=offs)

Each program computes one tile of one group; it finds its group from offs on the GPU (no host sync; the grid is
sized for the most tiles the rows can need). Two forms: the weights through pointers, or through a TMA descriptor
(the gathered rows cannot use TMA on sm90). Shape: Qwen3-30B-A3B's gate+up GEMM (128 experts, top-8, hidden 2048,
2 x 768 out), routing from random logits; also the pointer form without a gather (token_of_row = arange) on the
down GEMM's shape, which compares its GEMM rate with torch._grouped_mm's (CUTLASS) alone.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for m, n, k, w, s in [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3),
                                 (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 128, 8, 3),
                                 (64, 256, 64, 8, 4), (128, 256, 32, 8, 5)]]


@triton.jit
def _tile(offs_ptr, pid_m, NUM_GROUPS, GROUPS_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row tile pid_m of the groups' tiles, numbered in order: (group, rows, rows in the group, any tile at all)."""
    g = tl.arange(0, GROUPS_POW2)
    ends = tl.load(offs_ptr + g, mask=g < NUM_GROUPS, other=0)
    starts = tl.load(offs_ptr + g - 1, mask=(g >= 1) & (g < NUM_GROUPS), other=0)
    tiles = tl.where(g < NUM_GROUPS, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tile_ends = tl.cumsum(tiles, 0)
    group = tl.sum((tile_ends <= pid_m).to(tl.int32), 0)
    mine = g == group
    first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), 0)
    rows = tl.sum(tl.where(mine, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    return group, rows, rows < tl.sum(tl.where(mine, ends, 0), 0), pid_m < tl.sum(tiles, 0)


@triton.autotune(configs=CONFIGS, key=["N", "K", "NUM_GROUPS"])
@triton.jit
def _gathered(x_ptr, token_ptr, w_ptr, offs_ptr, y_ptr, N, K, NUM_GROUPS, stride_xt, stride_wg, stride_wk, stride_wn,
              stride_ys, GROUPS_POW2: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % tiles_n  # consecutive programs share one row tile (from L2)
    group, rows, in_group, live = _tile(offs_ptr, tl.program_id(0) // tiles_n, NUM_GROUPS, GROUPS_POW2, BLOCK_M)
    if not live:
        return
    # Rows past the group's end load token 0 (harmless) and are not stored: no load masks (K % BLOCK_K == 0).
    tokens = tl.load(token_ptr + rows, mask=in_group, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :]
    if USE_TMA:  # weights (G, N, K) with K contiguous
        desc = tl.make_tensor_descriptor(w_ptr, shape=[NUM_GROUPS, N, K], strides=[stride_wg, stride_wn, 1],
                                         block_shape=[1, BLOCK_N, BLOCK_K])
    else:
        b_ptrs = (w_ptr + group.to(tl.int64) * stride_wg + ks[:, None] * stride_wk
                  + tl.where(cols < N, cols, 0)[None, :] * stride_wn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if USE_TMA:
            b = desc.load([group, pid_n * BLOCK_N, k * BLOCK_K]).reshape(BLOCK_N, BLOCK_K).T
        else:
            b = tl.load(b_ptrs)
            b_ptrs += BLOCK_K * stride_wk
        acc = tl.dot(tl.load(a_ptrs), b, acc)
        a_ptrs += BLOCK_K
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ys + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=in_group[:, None] & (cols[None, :] < N))


def gathered(x, token_of_row, w, offs, use_tma=False):
    """torch._grouped_mm(x[token_of_row], w, offs=offs); w (G, K, N). Rows past offs[-1] are left unwritten."""
    rows, (groups, k, n) = token_of_row.shape[0], w.shape
    assert x.stride(1) == 1 and k % 128 == 0
    y = x.new_empty(rows, n)
    grid = lambda meta: ((triton.cdiv(rows, meta["BLOCK_M"]) + groups) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa
    _gathered[grid](x, token_of_row, w, offs, y, n, k, groups, x.stride(0), w.stride(0), w.stride(1), w.stride(2),
                    y.stride(0), GROUPS_POW2=triton.next_power_of_2(groups), USE_TMA=use_tma)
    return y


def _time_ms(fn, reps=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[2]


def _rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--json")
    args = parser.parse_args()
    experts, top_k, hidden, inter = 128, 8, 2048, 768
    dev, dt = "cuda", torch.bfloat16
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))  # TMA
    gate_up = (torch.randn(experts, 2 * inter, hidden, device=dev, dtype=dt) / hidden ** 0.5).transpose(-2, -1)
    down = (torch.randn(experts, hidden, inter, device=dev, dtype=dt) / inter ** 0.5).transpose(-2, -1)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "runs": []}
    for tokens in args.tokens:
        x = torch.randn(tokens, hidden, device=dev, dtype=dt)
        ids = torch.randn(tokens, experts, device=dev).topk(top_k, dim=-1).indices.flatten()
        token_of_row = ids.argsort(stable=True) // top_k
        offs = torch.bincount(ids, minlength=experts).cumsum(0).to(torch.int32)
        rows = token_of_row.shape[0]
        ref = torch._grouped_mm(x[token_of_row], gate_up, offs=offs)
        h, identity = torch.randn(rows, inter, device=dev, dtype=dt), torch.arange(rows, device=dev)
        gathered_rows = x[token_of_row]
        run = {
            "tokens": tokens, "rows": rows,
            "rel_err": _rel_err(gathered(x, token_of_row, gate_up, offs), ref),
            "rel_err_tma": _rel_err(gathered(x, token_of_row, gate_up, offs, use_tma=True), ref),
            "rel_err_down": _rel_err(gathered(h, identity, down, offs), torch._grouped_mm(h, down, offs=offs)),
            "gate_up_gather_then_grouped_mm_ms": _time_ms(lambda: torch._grouped_mm(x[token_of_row], gate_up,
                                                                                  offs=offs)),
            "gate_up_gather_ms": _time_ms(lambda: x[token_of_row]),
            "gate_up_grouped_mm_only_ms": _time_ms(lambda: torch._grouped_mm(gathered_rows, gate_up, offs=offs)),
            "gate_up_gathered_triton_ms": _time_ms(lambda: gathered(x, token_of_row, gate_up, offs)),
            "gate_up_gathered_triton_tma_ms": _time_ms(lambda: gathered(x, token_of_row, gate_up, offs, use_tma=True)),
            "gate_up_best_config": str(_gathered.best_config),
            "down_grouped_mm_ms": _time_ms(lambda: torch._grouped_mm(h, down, offs=offs)),
            "down_triton_no_gather_ms": _time_ms(lambda: gathered(h, identity, down, offs)),
        }
        flops = 2 * rows * hidden * 2 * inter
        run["gate_up_cutlass_tflops"] = flops / run["gate_up_grouped_mm_only_ms"] / 1e9
        run["gate_up_triton_tma_tflops"] = flops / run["gate_up_gathered_triton_tma_ms"] / 1e9
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
