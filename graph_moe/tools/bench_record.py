"""What every record `graph-moe bench` writes holds besides its numbers: the code measured, when, on which card,
with which torch and transformers, and the command that made it. GPU timings move 10-20% between machines of one
kind and between commits; a number without these facts cannot be compared or reproduced."""

from __future__ import annotations

import datetime
import logging
import os
import shlex
import subprocess

import torch

log = logging.getLogger("graph_moe")


def current_commit() -> str:
    """$GRAPH_MOE_COMMIT where set (a copy of the tree on a benchmark machine names its commit so: a `.git` there may be
    missing or stale); else `git rev-parse HEAD` of the checkout graph_moe runs from; else "unknown" (an installed
    wheel, no git)."""
    named = os.environ.get("GRAPH_MOE_COMMIT")
    if named:
        return named
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def card_name(device: str | None = None) -> str:
    """The GPU's name (torch.cuda.get_device_name), or "cpu" where the run is on the CPU or there is no GPU."""
    on_gpu = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    return torch.cuda.get_device_name() if on_gpu else "cpu"


def run_facts(subcommand: str, argv: list[str], device: str | None = None) -> dict:
    """commit, date (UTC, ISO 8601), card, torch and transformers versions, and the command line of a
    `graph-moe bench <subcommand> <argv>` run: the header of every JSON record the benchmarks write."""
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = "not installed"
    return {"commit": current_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "card": card_name(device), "torch": torch.__version__, "transformers": transformers_version,
            "command": shlex.join(["graph-moe", "bench", subcommand, *argv])}


def failed_run(variant: str, error: BaseException) -> dict:
    """The record of a variant that raised, in place of its numbers: the error, logged with its traceback. A bench
    measures its other variants after it (one failure on a benchmark machine must not cost the rest of the run),
    and exits with status 1."""
    log.error("graph-moe bench: %s failed", variant, exc_info=error)
    return {"variant": variant, "error": f"{type(error).__name__}: {error}"[:2000]}


def failed(record: dict) -> bool:
    """Whether any run of `record` failed (see failed_run)."""
    return any("error" in run for run in record["runs"])
