"""graph_moe under accelerate's dynamo plugin (`accelerate launch --dynamo_backend inductor`, with or without
`--dynamo_use_regional_compilation`, or `Accelerator(dynamo_plugin=TorchDynamoPlugin(backend="inductor", ...))`).

accelerate compiles the model itself, with a backend from its own list, when `prepare` runs: graph_moe's backend is
not on that list, and accelerate's regional compilation compiles shallow copies of the decoder layers (what
`graph_moe.compile` set on the originals is not used). So graph_moe rides along in Inductor instead:

    model = graph_moe.integrations.accelerate.enable(model)   # before accelerator.prepare(model, ...)

installs the traceable forwards, puts the pass into Inductor's global `pre_grad_custom_pass` (composed with any pass
there) and switches on, for the rest of the process, the Dynamo settings under which the expert loop traces into one
graph (`graph_moe.compile.CAPTURE_SETTINGS`). accelerate's plugin left off, `graph_moe.compile(model)` before
`prepare` is the faster way to compile (expert 0's body traced once per layer kind).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from graph_moe.compile import CAPTURE_SETTINGS
from graph_moe.inductor_pass import add_global_inductor_pass
from graph_moe.install import install
from graph_moe.passes import RewriteSettings

log = logging.getLogger("graph_moe")


def enable(model: nn.Module, *, settings: RewriteSettings | None = None, **rewrite_options) -> nn.Module:
    """Make `model` ready for accelerate's Inductor compile: install, the pass in Inductor's global config, the capture
    settings on in Dynamo's. settings / rewrite_options: the rewrite's, as `graph_moe.compile` takes them.
    Returns `model`."""
    report = install(model)
    add_global_inductor_pass(settings, **rewrite_options)
    for name, value in CAPTURE_SETTINGS.items():
        setattr(torch._dynamo.config, name, value)
    log.info("graph_moe: %d MoE block(s) installed for accelerate's Inductor compile; the pass is in Inductor's "
             "global config", report.num_installed)
    return model
