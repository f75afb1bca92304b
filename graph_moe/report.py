"""What the pass did to each expert loop: the record users read and the counters it feeds."""

from __future__ import annotations

import dataclasses
import logging

from torch._dynamo.utils import counters

from graph_moe import logs

log = logging.getLogger("graph_moe")


@dataclasses.dataclass
class LoopReport:
    """One expert loop found in one captured graph."""

    block: str  # where the loop lives, from Dynamo's module stack (e.g. "model.layers[0].mlp")
    num_experts: int
    top_k: int | None
    projections: list[str]  # grouped GEMMs emitted, e.g. ["gate_proj+up_proj", "down_proj"]
    rewritten: bool
    reason: str = ""  # why the loop was left as traced; empty when rewritten

    def __str__(self) -> str:
        head = f"{self.block}: {self.num_experts} experts, top-{self.top_k}"
        if self.rewritten:
            return f"{head} -> grouped GEMMs [{', '.join(self.projections)}]"
        return f"{head} -> left as traced: {self.reason}"


def record(reports: list[LoopReport]) -> None:
    """Feed the ecosystem's compile counters, the `graph_moe` artifact (one line per loop, shown by
    `TORCH_LOGS=graph_moe`) and the `graph_moe` log (a warning per loop left as traced, an INFO summary)."""
    c = counters["graph_moe"]
    per_loop = logs.loop_logger()
    for r in reports:
        c["loops_found"] += 1
        c["loops_rewritten" if r.rewritten else "loops_skipped"] += 1
        per_loop.debug("%s expert loop %s", "rewrote" if r.rewritten else "skipped", r)
        if not r.rewritten:
            log.warning("graph_moe left a loop as traced: %s", r)
    if reports:
        rewritten = sum(r.rewritten for r in reports)
        log.info("graph_moe: %d expert loop(s) in this graph, %d rewritten into grouped GEMMs, %d left as traced",
                 len(reports), rewritten, len(reports) - rewritten)


def reset_counters() -> None:
    counters["graph_moe"].clear()


def counter_snapshot() -> dict[str, int]:
    c = counters["graph_moe"]
    return {k: int(c[k]) for k in ("loops_found", "loops_rewritten", "loops_skipped")}


__all__ = ["LoopReport", "record", "reset_counters", "counter_snapshot"]
