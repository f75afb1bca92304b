"""`graph-moe` (also `python -m graph_moe`): demo, explain, dump, bench (tools/bench.py: layer, compile, step,
memory)."""

from __future__ import annotations

import argparse
import logging
import sys


def _model_args(p: argparse.ArgumentParser, family="olmoe"):
    p.add_argument("--model", default=family, help="model family (olmoe, qwen3_moe, qwen2_moe, mixtral) or a "
                   "config.json path; weights are random")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--tokens", type=int, default=256)


def _demo(args):
    from graph_moe.tools.demo import run_demo

    result = run_demo(args.model, tokens=args.tokens, layers=args.layers, experts=args.experts, top_k=args.top_k,
                      hidden=args.hidden, intermediate=args.intermediate, steps=args.steps, inner=args.inner,
                      compare_plain=not args.no_plain)
    print(result)
    ok = result.counters["loops_rewritten"] > 0 and result.max_logit_diff < 0.1
    print("\ndemo", "OK" if ok else "FAILED")
    return 0 if ok else 1


def _explain(args):
    import torch

    import graph_moe
    from graph_moe.tools.model_zoo import build_model

    model = build_model(args.model, layers=args.layers, experts=args.experts, top_k=args.top_k, hidden=args.hidden,
                        intermediate=args.intermediate)
    print(graph_moe.explain(model, torch.randint(0, model.config.vocab_size, (1, args.tokens))))
    return 0


def _dump(args):
    from graph_moe.tools.dump import dump_config

    index = dump_config(args.model, args.out, args.tokens, layers=args.layers, experts=args.experts,
                        top_k=args.top_k, hidden=args.hidden, intermediate=args.intermediate)
    print(index)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmarks have subcommands with options of their own (graph-moe bench --help)
        from graph_moe.tools.bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="graph-moe", description="Rewrite Mixture-of-Experts loops into grouped "
                                     "GEMMs under torch.compile.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="compile a small MoE model with and without graph_moe; parity and speed")
    _model_args(p)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--no-plain", action="store_true", help="skip plain torch.compile (its first call is slow)")
    p.set_defaults(fn=_demo)

    p = sub.add_parser("explain", help="which expert loops are found, rewritten or left, and why")
    _model_args(p, "qwen3_moe")
    p.set_defaults(fn=_explain)

    p = sub.add_parser("dump", help="depyf dump of the captured and rewritten graphs")
    _model_args(p, "qwen3_moe")
    p.add_argument("--out", default="graph_moe_dump", help="output folder")
    p.set_defaults(fn=_dump)

    sub.add_parser("bench", help="benchmarks: layer, compile, step, memory (graph-moe bench --help)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "demo" else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
