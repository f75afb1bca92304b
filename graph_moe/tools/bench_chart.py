"""`graph-moe bench chart`: a PNG of step times against the peers, drawn from `graph-moe bench step` records (or of
one MoE layer, from a `graph-moe bench layer` record).

    graph-moe bench chart records/step_full_tf517.json records/step_full_tf524.json --out docs/step.png
    graph-moe bench chart benchmarks/records/h200_torch2.11_qwen3_layer.json --out docs/layer.png

One group of bars per record (its card, transformers version and experts), one bar per variant: the step's time in ms,
with the first step's (compile) seconds written on each bar. Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
import sys

LABELS = {"torch_compile": "torch.compile (transformers' own experts)", "eager": "eager (as loaded)",
          "graph_moe": "graph_moe.compile",
          "backend": "graph_moe.backend", "backend_shared": "graph_moe.backend, shared trace"}


def draw(records: list[dict], out: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(run["variant"] for record in records for run in record["runs"]))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(2.2 + 2.6 * len(records), 3.6))
    for i, variant in enumerate(variants):
        labelled = False  # each variant named once in the legend, at its first bar
        for g, record in enumerate(records):
            run = next((r for r in record["runs"] if r["variant"] == variant and "error" not in r), None)
            if run is None:  # not run, or failed
                continue
            x = g + (i - (len(variants) - 1) / 2) * width
            bar = ax.bar(x, run["step_ms"], width, color=f"C{i}",
                         label=None if labelled else LABELS.get(variant, variant))
            labelled = True
            ax.bar_label(bar, [f"{run['step_ms']:.1f} ms\n(1st {run['first_step_s']:.0f} s)"], fontsize=8)
    def group(r):
        routing = r.get("routing", "uniform")
        return (f"transformers {r['transformers']}\n{r['experts']} experts, {r['tokens']} tokens"
                + ("" if routing == "uniform" else f"\n{routing} routing"))
    ax.set_xticks(range(len(records)), [group(r) for r in records], fontsize=8)
    ax.set_ylabel("training step, ms (lower is better)")
    ax.margins(y=0.25)
    first = records[0]
    ax.set_title(title or f"{first['layers']} Qwen3-30B-A3B-shaped layers, {first['card']}, torch {first['torch']}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)  # below the bars' labels
    fig.tight_layout()
    fig.savefig(out, dpi=130)


# one MoE layer (`graph-moe bench layer` records): the variants drawn, as the layer bench names them
LAYER_VARIANTS = {"grouped_compiled": "transformers 5's grouped forward, torch.compile", "graph_moe": "graph_moe"}


def draw_layer(record: list[dict], out: str, metric: str = "fwd_bwd_ms") -> None:
    """One group of bars per token count of a layer record, one bar per variant: `<variant>_<metric>`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facts, rows = record[0], [r for r in record[1:] if "tokens" in r]
    width = 0.8 / len(LAYER_VARIANTS)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (variant, label) in enumerate(LAYER_VARIANTS.items()):
        for g, row in enumerate(rows):
            value = row.get(f"{variant}_{metric}")
            if value is None:
                continue
            bar = ax.bar(g + (i - (len(LAYER_VARIANTS) - 1) / 2) * width, value, width, color=f"C{i}",
                         label=label if g == 0 else None)
            ax.bar_label(bar, [f"{value:.2f}"], fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{row['tokens']} tokens" for row in rows])
    ax.set_ylabel(f"{metric.replace('_ms', '').replace('_', '+')}, ms (lower is better)")
    ax.margins(y=0.2)
    ax.set_title(f"one {rows[0]['shape']} MoE layer, {facts.get('card', '')}, torch {facts.get('torch', '')}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="graph-moe bench chart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", nargs="+", help="JSON records written by `graph-moe bench step`")
    p.add_argument("--out", default="bench_step.png")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    records = []
    for path in args.records:
        with open(path) as f:
            records.append(json.load(f))
    if isinstance(records[0], list):  # a `bench layer` record: a list of rows after the card's facts
        draw_layer(records[0], args.out)
    else:
        draw(records, args.out, args.title)
    print(args.out)
    return 0
