"""`graph-moe bench decode`: generation with the KV cache, a Qwen3-30B-A3B-shaped model from a config (random weights):
the time of one decode step (a new token for each of `batch` sequences) after a prompt, per variant, at each batch.

    graph-moe bench decode --layers 4 --batches 1 16 64 --json decode.json

Variants: `eager` (the model as loaded: transformers 4.x's expert loop, or 5.x's grouped_mm), `graph_moe`
(graph_moe.compile: each layer's attention eager, its MoE block compiled, shared by every layer),
`graph_moe_reduce_overhead` (the same with mode="reduce-overhead": CUDA graphs, under which the pass emits its
few-rows grouped GEMM), and on transformers
5.x `torch_compile_grouped_mm` / `torch_compile_batched_mm` (that experts_implementation, a static cache: generate
then compiles the forward itself, on a GPU). A decode step's time is (time of 1 + N new tokens - time of 1 new token)
/ N, greedy, after one warm-up generation; the record also says how many graphs each variant compiled and whether
its tokens equal the first variant's.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time

import torch

import graph_moe
from graph_moe.tools.bench_record import failed, failed_run, run_facts
from graph_moe.tools.model_zoo import add_shape_arguments, shape_config

log = logging.getLogger("graph_moe")


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _generate(model, prompts, new_tokens):
    return model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)


def _timed(model, prompts, new_tokens, device):
    _sync(device)
    start = time.perf_counter()
    out = _generate(model, prompts, new_tokens)
    _sync(device)
    return time.perf_counter() - start, out


def prepare(variant: str, base, inner: str):
    """A copy of `base` made ready for `variant`."""
    model = copy.deepcopy(base)
    if variant == "graph_moe":
        graph_moe.compile(model, inner=inner)
    elif variant == "graph_moe_reduce_overhead":  # CUDA graphs: the few-rows grouped GEMM kernel where it fits
        graph_moe.compile(model, inner=inner, mode="reduce-overhead")
    elif variant.startswith("torch_compile_"):
        # as transformers advises for compiled generation: a static cache, with which generate compiles the forward
        # itself (on a GPU)
        model.set_experts_implementation(variant.removeprefix("torch_compile_"))
        model.generation_config.cache_implementation = "static"
    return model


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="graph-moe bench decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64], help="sequences decoded together")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed")
    p.add_argument("--variants", nargs="+", default=["eager", "graph_moe"],
                   choices=["eager", "graph_moe", "graph_moe_reduce_overhead", "torch_compile_grouped_mm",
                            "torch_compile_batched_mm"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--inner", default="inductor", help="graph_moe's compiler after the pass (aot_eager: CPU runs)")
    p.add_argument("--json", default="bench_decode.json")
    args = p.parse_args(argv)
    import transformers as tf

    config = shape_config(args)
    torch.manual_seed(0)
    with torch.device(args.device):
        base = tf.AutoModelForCausalLM.from_config(config, torch_dtype=getattr(torch, args.dtype)).eval()
    base.requires_grad_(False)  # inference: transformers 4.x experts laid out once, not stacked per step
    record = {**run_facts("decode", argv, args.device), "layers": args.layers, "num_experts": args.num_experts,
              "prompt": args.prompt, "new_tokens": args.new_tokens, "dtype": args.dtype, "runs": []}
    prompts = {b: torch.randint(1, args.vocab, (b, args.prompt), device=args.device) for b in args.batches}
    expected = {}
    for variant in args.variants:
        try:
            measure(variant, base, prompts, expected, record, args)
        except Exception as error:  # noqa: BLE001  (recorded; the other variants still run)
            record["runs"].append(failed_run(variant, error))
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)
    print(table(record))
    return int(failed(record))


def measure(variant: str, base, prompts: dict, expected: dict, record: dict, args) -> None:
    """`variant`'s decode step at each batch, appended to `record` (and its JSON) batch by batch; the first variant's
    tokens become `expected`."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = prepare(variant, base, args.inner)
    for batch in args.batches:
        start = time.perf_counter()
        _generate(model, prompts[batch], 2)  # warm-up: compiles prefill and decode
        warm = time.perf_counter() - start
        one, _ = _timed(model, prompts[batch], 1, args.device)
        many, tokens = _timed(model, prompts[batch], 1 + args.new_tokens, args.device)
        expected.setdefault(batch, tokens)
        run = {"variant": variant, "batch": batch, "first_call_s": warm,
               "decode_step_ms": 1e3 * (many - one) / args.new_tokens,
               "tokens_equal_first_variant": bool(torch.equal(tokens, expected[batch])),
               "graphs_compiled": torch._dynamo.utils.counters["stats"]["unique_graphs"],
               **graph_moe.counter_snapshot()}
        record["runs"].append(run)
        log.info("%s", json.dumps(run))
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


def table(record: dict) -> str:
    lines = [f"{record['card']}, torch {record['torch']}, transformers {record['transformers']}; {record['layers']} "
             f"layers, {record['num_experts']} experts, prompt {record['prompt']}, {record['dtype']}",
             "| variant | batch | decode step, ms | first call, s | graphs | tokens = first variant's |",
             "|---|---|---|---|---|---|"]
    for r in record["runs"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | | failed: {r['error'].splitlines()[0][:100]} | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['batch']} | {r['decode_step_ms']:.2f} | {r['first_call_s']:.1f} | "
                     f"{r['graphs_compiled']} | {r['tokens_equal_first_variant']} |")
    return "\n".join(lines)
