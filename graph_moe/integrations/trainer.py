"""graph_moe in the HF Trainer and the trainers built on it (TRL's SFTTrainer, DPOTrainer, ...): one callback.

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[graph_moe.GraphMoeCallback()])

At the end of the Trainer's `__init__` (after TRL has wrapped the model in its PEFT adapters) the callback runs
`graph_moe.compile` on the model: the MoE blocks installed, each decoder layer compiled on its own with the
graph_moe backend. The Trainer's own `torch_compile` stays off: accelerate compiles the whole model with a backend
from its own closed list (`torch_compile_backend="graph_moe"` is refused there: "'GRAPH_MOE' is not a valid
DynamoBackend"), and a whole-model compile around the compiled layers would trace the expert loops again without
graph_moe's pass. Gradient accumulation, gradient checkpointing (the Trainer's checkpointing wraps each compiled
layer) and `resume_from_checkpoint` go through unchanged; checkpoints hold transformers' own parameter names.
"""

from __future__ import annotations

import logging

import transformers

from graph_moe.compile import compile as compile_model

log = logging.getLogger("graph_moe")


class GraphMoeCallback(transformers.TrainerCallback):
    """Compile the Trainer's model with `graph_moe.compile` once the Trainer is built.
    compile_kwargs: passed to `graph_moe.compile` (inner=, settings=, stack_experts=, mode=, ...)."""

    def __init__(self, **compile_kwargs):
        self.compile_kwargs = compile_kwargs

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if args.torch_compile:
            raise ValueError("GraphMoeCallback compiles each decoder layer itself: leave TrainingArguments' "
                             "torch_compile off (accelerate would compile the whole model again around it)")
        if model is None:
            raise ValueError("GraphMoeCallback needs the Trainer's model at init (model_init is not supported)")
        if getattr(model, "_graph_moe_install_report", None) is not None:
            log.info("graph_moe: %s already compiled by graph_moe.compile; left as it is", type(model).__name__)
            return
        compile_model(model, **self.compile_kwargs)
