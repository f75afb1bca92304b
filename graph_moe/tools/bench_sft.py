"""`graph-moe bench sft`: TRL's SFTTrainer with LoRA r=16 on every expert projection, a Qwen3-30B-A3B-shaped model
from a config (random weights, bf16), with and without graph_moe: tokens per second of the training steps after the
first `--warmup`, the first step's time (compile), peak GPU memory, and the losses of both.

    graph-moe bench sft --layers 4 --batch 4 --length 1024 --steps 12 --json sft.json

Variants: `peft` (TRL + PEFT as users run them: transformers 4.x's expert loop, or 5.x's grouped_mm experts with
PEFT's target_parameters LoRA) and `graph_moe` (the same trainer with `callbacks=[graph_moe.GraphMoeCallback()]`).
Rows are random texts of `--length` words of a word-level tokenizer built here (model_zoo.word_tokenizer).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time

import torch

import graph_moe
from graph_moe.tools.bench_record import failed, failed_run, run_facts
from graph_moe.tools.model_zoo import add_shape_arguments, expert_lora_targets, shape_config, word_texts, word_tokenizer

log = logging.getLogger("graph_moe")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="graph-moe bench sft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=1024, help="tokens per row")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the throughput (the first compiles)")
    p.add_argument("--variants", nargs="+", default=["peft", "graph_moe"], choices=["peft", "graph_moe"])
    p.add_argument("--inner", default="inductor", help="graph_moe's compiler after the pass (aot_eager: CPU runs)")
    p.add_argument("--json", default="bench_sft.json")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    record = {**run_facts("sft", argv, "cuda" if cuda else "cpu"), "layers": args.layers,
              "num_experts": args.num_experts, "batch": args.batch, "length": args.length, "runs": []}
    texts = word_texts(args.batch * args.steps, args.length - 1, args.vocab, torch.Generator().manual_seed(0))
    for variant in args.variants:
        try:
            run = measure(variant, texts, args, cuda)
        except Exception as error:  # noqa: BLE001  (recorded; the other variant still runs)
            run = failed_run(variant, error)
        record["runs"].append(run)
        log.info("%s", json.dumps(run))
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    print(table(record))
    return int(failed(record))


def measure(variant: str, texts: list[str], args, cuda: bool) -> dict:
    """One SFTTrainer run of `variant` on a fresh model: step times, tokens per second, peak memory, losses."""
    import transformers as tf
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    class StepTimes(tf.TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    torch._dynamo.reset()
    graph_moe.report.reset_counters()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(shape_config(args), torch_dtype=torch.bfloat16)
    if cuda:
        model, _ = model.cuda(), torch.cuda.reset_peak_memory_stats()
    steps = StepTimes()
    callbacks = [steps] + ([graph_moe.GraphMoeCallback(inner=args.inner)] if variant == "graph_moe" else [])
    with tempfile.TemporaryDirectory() as out:
        settings = trl.SFTConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                                 logging_steps=1, learning_rate=1e-4, bf16=True, use_cpu=not cuda, report_to=[],
                                 save_strategy="no", disable_tqdm=True, max_length=args.length)
        trainer = trl.SFTTrainer(model=model, args=settings, train_dataset=Dataset.from_dict({"text": texts}),
                                 processing_class=word_tokenizer(args.vocab),
                                 peft_config=LoraConfig(r=16, **expert_lora_targets()), callbacks=callbacks)
        trainer.train()
    timed = sorted(steps.times[args.warmup:])
    return {"variant": variant, "first_step_s": steps.times[0], "step_ms": 1e3 * timed[len(timed) // 2],
            "tokens_per_s": args.batch * args.length / timed[len(timed) // 2],
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            **graph_moe.counter_snapshot()}


def table(record: dict) -> str:
    lines = [f"{record['card']}, torch {record['torch']}, transformers {record['transformers']}; {record['layers']} "
             f"layers, {record['num_experts']} experts, batch {record['batch']} x {record['length']} tokens",
             "| variant | tokens/s | step, ms | first step, s | peak GB | first losses |", "|---|---|---|---|---|---|"]
    for r in record["runs"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'].splitlines()[0][:100]} | | | | |")
            continue
        peak = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        losses = ", ".join(f"{x:.3f}" for x in r["losses"][:3])
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | {r['first_step_s']:.1f} | "
                     f"{peak} | {losses} |")
    return "\n".join(lines)
