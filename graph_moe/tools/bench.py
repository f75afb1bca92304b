"""`graph-moe bench <subcommand>`: the one entry point of the benchmarks. Each subcommand has its own options
(`graph-moe bench <subcommand> --help`), prints a table and writes every number to a JSON record whose header says
which commit, card, torch and transformers made it, when, and with which command (tools/bench_record.py)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand: (module under graph_moe.tools, one line for the overview)
SUBCOMMANDS = {
    "layer": ("bench_layer", "one MoE layer on the GPU: graph_moe against the HF loop and the grouped references, "
              "forward and forward+backward, frozen / LoRA / QLoRA experts, at real shapes"),
    "compile": ("bench_compile", "compile time of a training step (1 to 24 decoder layers) against Inductor on the "
                "unrolled loop and a dense model, then the recompiles over new sequence lengths (CPU or GPU)"),
    "step": ("bench_step", "a whole model's training step: compiled whole with graph_moe.backend (with and without "
             "shared_block_trace) and with graph_moe.compile, against eager: first step, step, gradients"),
    "decode": ("bench_decode", "generation with the KV cache: one decode step's time at batch 1-64, graph_moe against "
               "eager and transformers 5.x's grouped_mm / batched_mm under torch.compile"),
    "sft": ("bench_sft", "TRL SFTTrainer with LoRA on every expert: tokens per second with and without graph_moe"),
    "chart": ("bench_chart", "a PNG of whole-step times against the peers, from `bench step` records (matplotlib)"),
    "memory": ("bench_memory", "peak GPU memory of one MoE layer's forward+backward, each variant measured alone, and "
               "what is alive at the peak"),
}


def _overview() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graph-moe bench", description=__doc__,
                                     epilog="`graph-moe bench <options>` without a subcommand runs `layer` "
                                     "(`--compile-time` runs `compile`).")
    sub = parser.add_subparsers(dest="subcommand", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (_, summary) in SUBCOMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        _overview().print_help()
        return 0
    if argv[:1] == ["--compile-time"]:  # the form before subcommands
        name, rest = "compile", argv[1:]
    elif argv[:1] and argv[0] in SUBCOMMANDS:
        name, rest = argv[0], argv[1:]
    else:  # `graph-moe bench [layer options]`, the form before subcommands
        name, rest = "layer", argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    module = importlib.import_module(f"graph_moe.tools.{SUBCOMMANDS[name][0]}")
    return module.main(rest)
