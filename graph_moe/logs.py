"""The `graph_moe` torch._logging artifact: `TORCH_LOGS=graph_moe` prints one line per expert loop.

    TORCH_LOGS=graph_moe python train.py            # one line per loop found: rewritten, or skipped and why
    torch._logging.set_logs(modules={"graph_moe": True})   # the same from Python (TORCH_LOGS unset)

Two quirks of registering an artifact from outside torch (torch 2.13):

* torch parses TORCH_LOGS once, inside `import torch`, before any other package can register a name. A name it
  does not know but can import is taken for a module: `TORCH_LOGS=graph_moe` makes torch import this package
  there and then, and register the `graph_moe` logger as a *log* (so its INFO lines show, with torch's
  format). When the settings are parsed again (`_init_logs`), a registered log wins over an artifact of the
  same name. So the artifact is never enabled by the parse; `sync()` enables it itself whenever TORCH_LOGS
  names it, which is idempotent and survives torch re-parsing the settings.
* An artifact logger prints only through a handler torch installed on one of its ancestors. The `graph_moe`
  logger has one only when TORCH_LOGS names it, so the artifact logger hangs under `torch` (whose handler
  is always there); its records never reach the root logger, and the name is not printed anyway.
"""

from __future__ import annotations

import logging
import os

import torch._logging
from torch._logging import _internal

ARTIFACT = "graph_moe"
DESCRIPTION = "One line per MoE expert loop graph_moe found: rewritten into grouped GEMMs, or left as traced and why"
_QNAME = "torch.graph_moe"  # the artifact logger is "torch.graph_moe.__graph_moe"

_logger: logging.Logger | None = None


def register() -> None:
    """Register the artifact name with torch._logging (idempotent)."""
    if ARTIFACT not in _internal.log_registry.artifact_names:
        _internal.register_artifact(ARTIFACT, DESCRIPTION, visible=True, off_by_default=False)


def named_in_env() -> bool:
    """Whether TORCH_LOGS asks for the artifact: "graph_moe" or "+graph_moe" among its names ("-graph_moe",
    the module log at ERROR, does not)."""
    names = os.environ.get(_internal.LOG_ENV_VAR, "")
    return ARTIFACT in {n.strip().lstrip("+") for n in names.split(",")}


def sync() -> None:
    """Enable the artifact if TORCH_LOGS names it and torch's parse did not (see the module docstring)."""
    register()
    state = _internal.log_state  # torch rebinds this global on every parse: read it each time
    if named_in_env() and not state.is_artifact_enabled(ARTIFACT):
        state.enable_artifact(ARTIFACT)
        if _logger is not None:
            _internal.configure_artifact_log(_logger)


def loop_logger() -> logging.Logger:
    """The artifact logger for per-loop lines (log at DEBUG, as torch's own artifacts do)."""
    global _logger
    register()
    if _logger is None:
        _logger = torch._logging.getArtifactLogger(_QNAME, ARTIFACT)
    sync()
    return _logger


def enabled() -> bool:
    return loop_logger().isEnabledFor(logging.DEBUG)


register()

__all__ = ["ARTIFACT", "register", "sync", "loop_logger", "enabled", "named_in_env"]
