"""LoRA on every expert projection of a Qwen3-MoE, trained data-parallel (FSDP2 or DDP) through graph_moe.

    torchrun --nproc_per_node 2 examples/fsdp_lora.py --parallel fsdp2 --device cpu --inner aot_eager --check
    torchrun --nproc_per_node 8 examples/fsdp_lora.py --parallel ddp --device cuda

Each rank takes its slice of one global batch. FSDP2 (`fully_shard` on each decoder layer, then the root) or DDP
averages the gradients, so a step equals one single-process step on the whole global batch: `--check` runs that
single-process eager step (the untouched model, no graph_moe) on every rank and compares the loss and every
gradient (bf16 tolerance); the script exits non-zero if they differ.

Order and weights:
- FSDP2: `graph_moe.install(model, stack_experts=True)` first, then `fully_shard`, then `graph_moe.compile` (one
  torch.compile per decoder layer). With stack_experts each MoE block's expert weights are two parameters,
  gate_up (E, 2I, H) and down (E, H, I), and the adapters one lora_A/lora_B parameter per projection: FSDP2 shards
  them along the experts and all-gathers, per layer, exactly the (E, out, in) tensors the grouped GEMMs read (6 + 2
  parameters per layer instead of 3 x E + 6 x E). `--per-expert-weights` shows the other order, shard first and
  install after: the expert weights are then DTensor shards of each expert's Linear (install report: "sharded
  experts"), and the pass stacks the all-gathered weights into (E, out, in) in every forward and backward (a copy
  of the layer's experts each time). Installing WITHOUT stack_experts before sharding would be wrong: the plain
  grouped layout would keep a full, unsharded stack of every layer's experts on every rank, which FSDP2 does not
  know about.
- DDP: `graph_moe.compile` first (the layout is built as on one process: frozen experts are replicated anyway,
  and DDP's initial broadcast writes into the parameters, which are views of the layout), then
  DistributedDataParallel around the model; only the LoRA parameters are in DDP's buckets.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model

import graph_moe
from graph_moe.stacked_adapters import split_stacked
from graph_moe.stacked_experts import split_stacked_experts
from graph_moe.tools.model_zoo import build_model

LORA_TARGETS = ["gate_proj", "up_proj", "down_proj"]  # the expert projections (Qwen3-MoE has no dense MLP here)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parallel", choices=["fsdp2", "ddp"], default="fsdp2")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=32)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--seq", type=int, default=7)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (8: bf16 rows of 16 bytes, as torch._grouped_mm needs)")
    p.add_argument("--compile", choices=["graph_moe", "plain", "none"], default="graph_moe",
                   help="graph_moe.compile (default); plain torch.compile of each decoder layer (the expert loop as "
                        "HF wrote it); none: eager. The last two are the baselines for the step time")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0,
                   help="DDP's gradient bucket size (small values make many buckets: tests use it)")
    p.add_argument("--per-expert-weights", action="store_true",
                   help="FSDP2: shard the per-expert weights as transformers made them, then install (the pass then "
                        "stacks the all-gathered weights per forward); default: stack them first (stack_experts)")
    p.add_argument("--train-experts", action="store_true",
                   help="also train the expert weights (full fine-tuning of the experts beside the adapters)")
    p.add_argument("--check", action="store_true",
                   help="compare step 0's loss and every gradient with a single-process eager run; exit 1 if not equal")
    return p.parse_args(argv)


def build(args, device) -> torch.nn.Module:
    model = build_model("qwen3_moe", layers=args.layers, experts=args.experts, top_k=args.top_k, hidden=args.hidden,
                        intermediate=args.intermediate, vocab=args.vocab, device=device)
    torch.manual_seed(1)  # the same adapters on every rank
    # --check: random B as well as A (PEFT's default B = 0 would make every gradient of A zero, a weak comparison).
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=LORA_TARGETS,
                        init_lora_weights=not args.check)
    # bf16 adapters: every adapter GEMM can take torch._grouped_mm (fp32 ones take graph_moe's fallback op).
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    if args.train_experts:
        for name, p in model.named_parameters():
            if ".experts." in name and "lora_" not in name:
                p.requires_grad_(True)
    return model


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_base_model().model.layers


def compile_layers(model, args):
    if args.compile == "graph_moe":
        graph_moe.compile(model, inner=args.inner)
    elif args.compile == "plain":  # what one would do without graph_moe: regional compile, same inner compiler
        for layer in decoder_layers(model):
            layer.compile(backend=args.inner)


def parallelize(model, args, device):
    """Returns (the module to call, the model whose named_parameters() hold the LoRA weights)."""
    if args.parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(args.device, (dist.get_world_size(),))
        if args.compile == "graph_moe" and not args.per_expert_weights:
            graph_moe.install(model, stack_experts=True)  # before sharding: FSDP2 shards the stacks
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        compile_layers(model, args)  # after sharding (Dynamo sees FSDP2's hooks and parameters)
        return model, model
    from torch.nn.parallel import DistributedDataParallel

    compile_layers(model, args)
    # The HF loop skips experts no token chose, so some adapters get no gradient in a step: DDP must look for
    # them. graph_moe's grouped experts use every adapter (zero gradients), so DDP need not.
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=args.compile != "graph_moe",
                                  bucket_cap_mb=args.bucket_cap_mb)
    return ddp, model


def global_batch(args, step, world, device):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, args.vocab, (world * args.batch, args.seq), generator=gen).to(device)


def trained_grads(model) -> dict[str, torch.Tensor]:
    """Every gradient of a trained parameter, whole (FSDP2 keeps sharded DTensor gradients: gathered here, a
    collective), under the untouched model's names (graph_moe.install stacks each projection's expert adapters, and
    with stack_experts the expert weights, into one parameter)."""
    grads = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        grad = p.grad if p.grad is not None else torch.zeros_like(p)  # eager skips experts no token reached
        grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return split_stacked_experts(split_stacked(grads), model)


def eager_step(reference, ids):
    reference.zero_grad()
    loss = reference(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), trained_grads(reference)


def compare(loss, grads, ref_loss, ref_grads) -> list[str]:
    """What differs beyond bf16 rounding (empty when equal)."""
    def close(a, b):
        return torch.allclose(a.float(), b.float(), atol=3e-2, rtol=3e-2)

    problems = [] if close(loss, ref_loss) else [f"loss {loss.item():.5f} != eager {ref_loss.item():.5f}"]
    if grads.keys() != ref_grads.keys():
        problems.append(f"trained parameters differ: {sorted(grads.keys() ^ ref_grads.keys())[:4]}")
    for name in sorted(grads.keys() & ref_grads.keys()):
        if not close(grads[name], ref_grads[name]):
            diff = (grads[name].float() - ref_grads[name].float()).abs().max().item()
            problems.append(f"{name}: max |grad - eager grad| = {diff:.3g}")
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    model = build(args, device)
    reference = copy.deepcopy(model) if args.check else None  # untouched: no install, no sharding, no compile
    module, model = parallelize(model, args, device)
    if args.compile == "graph_moe":
        report = model._graph_moe_install_report
        installed = sum(b.status.endswith("installed") for b in report.blocks)  # FSDP2: installed before sharding
        print(f"[rank {rank}] installed {installed}/{len(report.blocks)} MoE blocks; expert weights: "
              f"{sorted({b.weights for b in report.blocks})}", flush=True)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    failed = False
    step_times = []
    for step in range(args.steps):
        start = time.perf_counter()
        ids = global_batch(args, step, world, device)
        local = ids[rank * args.batch:(rank + 1) * args.batch]
        loss = module(input_ids=local, labels=local, use_cache=False).loss
        loss.backward()
        # Every rank has the same number of tokens, so the mean of the ranks' losses is the global batch's loss.
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        global_loss /= world
        if step == 0 and args.check:
            grads = trained_grads(model)  # a collective under FSDP2: every rank calls it
            problems = compare(global_loss, grads, *eager_step(reference, ids))
            failed = bool(problems)
            for problem in problems:
                print(f"[rank {rank}] CHECK FAILED: {problem}", flush=True)
            if not problems:
                print(f"[rank {rank}] check passed: loss and {len(grads)} gradients equal the "
                      f"single-process eager run", flush=True)
        opt.step()
        opt.zero_grad()
        if args.device == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)  # step 0 (--check: 0 and 1) includes compiling / checking
        if rank == 0:
            print(f"step {step}: loss {global_loss.item():.4f}", flush=True)
    print(f"[rank {rank}] graph_moe counters: {graph_moe.counter_snapshot()}", flush=True)
    steady = step_times[2:]
    if rank == 0 and steady:
        print(f"step time ({args.parallel}, {world} ranks, {args.compile}): {1e3 * statistics.median(steady):.1f} ms "
              f"(median of steps 2-{args.steps - 1}; step 0 took {step_times[0]:.1f} s)", flush=True)

    # Every rank exits with the same status.
    status = torch.tensor([int(failed)], device=device)
    dist.all_reduce(status, op=dist.ReduceOp.MAX)
    # Free DDP's reducer while its process group is alive: freed at interpreter exit, it can hang (gloo).
    del module, model, opt
    gc.collect()
    dist.destroy_process_group()
    return int(status.item())


if __name__ == "__main__":
    raise SystemExit(main())
