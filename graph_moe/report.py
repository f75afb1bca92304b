"""The counters and logs that the pass's loop reports feed (the reports themselves: graph_moe.passes.report)."""

from __future__ import annotations

import logging

from torch._dynamo.utils import counters

from graph_moe import logs
from graph_moe.passes.report import LoopReport, hint_for

log = logging.getLogger("graph_moe")


def record(reports: list[LoopReport]) -> None:
    """Feed the ecosystem's compile counters, the `graph_moe` artifact (one line per loop, shown by
    `TORCH_LOGS=graph_moe`) and the `graph_moe` log (a warning per loop left as traced, an INFO summary)."""
    c = counters["graph_moe"]
    per_loop = logs.loop_logger()
    for r in reports:
        c["loops_found"] += 1
        c["loops_rewritten" if r.rewritten else "loops_skipped"] += 1
        c["loops_traced_once"] += r.traced_once
        per_loop.debug("%s expert loop %s", "rewrote" if r.rewritten else "skipped", r)
        if not r.rewritten:
            log.warning("graph_moe left a loop as traced: %s", r)
    if reports:
        rewritten = sum(r.rewritten for r in reports)
        log.info("graph_moe: %d expert loop(s) in this graph, %d rewritten into grouped GEMMs, %d left as traced",
                 len(reports), rewritten, len(reports) - rewritten)
    blocks = {r.block for r in reports if not r.in_subgraph}  # traced one by one into this very graph
    if len(blocks) > 1 and not any(r.traced_once for r in reports):
        log.info("graph_moe: %d MoE blocks in one graph, each traced expert by expert (seconds a block at 128 "
                 "experts): graph_moe.compile(model) compiles one decoder layer of each kind with expert 0's body "
                 "alone, or graph_moe.install(model, shared_block_trace=True) traces each kind of block once",
                 len(blocks))


def reset_counters() -> None:
    counters["graph_moe"].clear()


def counter_snapshot() -> dict[str, int]:
    c = counters["graph_moe"]
    return {k: int(c[k]) for k in ("loops_found", "loops_rewritten", "loops_skipped", "loops_traced_once",
                                   "weight_stacks_per_forward")}


__all__ = ["LoopReport", "hint_for", "record", "reset_counters", "counter_snapshot"]
