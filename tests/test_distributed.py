"""graph_moe under FSDP2 and DDP: 2 processes on the CPU (gloo), launched by torchrun on examples/fsdp_lora.py.

Each run's `--check` compares step 0's loss and every trained gradient with a single-process eager run of the same
model on the whole global batch (bf16 tolerance) and makes the launch fail otherwise; here we also require every
MoE block installed and every expert loop rewritten, none skipped, on every rank.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "fsdp_lora.py")
WORLD = 2

sys.path.insert(0, os.path.join(ROOT, "examples"))
import fsdp_lora  # noqa: E402


# DDP: adapters of 1.5 MB per layer in buckets of 1 MB, so that Dynamo's DDPOptimizer would cut each layer's graph
# (and its expert loop) in two if graph_moe.compile did not turn it off.
EXTRA = {"fsdp2": [], "fsdp2-per-expert": ["--per-expert-weights"], "fsdp2-train-experts": ["--train-experts"],
         "ddp": ["--bucket-cap-mb", "1", "--hidden", "256", "--intermediate", "256", "--experts", "8", "--rank", "64"]}

# What each launch must report: the install's "expert weights" column, and whether the rewritten graphs stack
# per-expert weights (a copy per forward). FSDP2 with stack_experts (installed before fully_shard) shards the stacks,
# so the all-gathered stacks feed the grouped GEMMs as they are; shard-then-install leaves per-expert DTensors.
EXPECTED = {"fsdp2": ("grouped layout, stacked parameters; LoRA stacked (3 projection x adapter)", False),
            "fsdp2-per-expert": ("per expert: sharded experts", True),
            "fsdp2-train-experts": ("grouped layout, stacked parameters; LoRA stacked (3 projection x adapter)", False),
            "ddp": ("grouped layout; LoRA stacked (3 projection x adapter)", False)}


def _launch(variant: str) -> str:
    parallel = variant.split("-")[0]
    # PYTHONPATH: the workers import graph_moe from this tree even if the installed copy points elsewhere.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    # In a process group of its own: on a timeout the launcher AND its workers are killed (no orphan holding the cores).
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", EXAMPLE,
         "--parallel", parallel, "--device", "cpu", "--inner", "aot_eager", "--steps", "2", "--check",
         *EXTRA[variant]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{variant} launch timed out\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return stdout


@pytest.mark.parametrize("variant", ["fsdp2", "fsdp2-per-expert", "fsdp2-train-experts", "ddp"])
def test_lora_training_matches_single_process_eager(variant):
    out = _launch(variant)
    weights_expected, copies_expected = EXPECTED[variant]
    for rank in range(WORLD):
        assert f"[rank {rank}] check passed" in out, out
        installed = re.search(rf"\[rank {rank}\] installed (\d+)/(\d+) MoE blocks; expert weights: (\[[^\]]*\])", out)
        assert installed and installed.group(1) == installed.group(2) == "2", out  # both layers' MoE blocks
        weights = ast.literal_eval(installed.group(3))
        assert len(weights) == 1 and weights[0].startswith(weights_expected), weights
        counters = ast.literal_eval(re.search(rf"\[rank {rank}\] graph_moe counters: (\{{[^}}]*\}})", out).group(1))
        assert counters["loops_rewritten"] == counters["loops_found"] >= 1 and counters["loops_skipped"] == 0, counters
        assert (counters.get("weight_stacks_per_forward", 0) > 0) == copies_expected, counters
    assert re.search(r"step 1: loss \d", out), out


def test_check_reports_a_wrong_gradient():
    """The comparison `--check` relies on fails on a loss or a gradient off by more than bf16 rounding."""
    grads = {"a.lora_A.weight": torch.randn(8, 32, dtype=torch.bfloat16), "a.lora_B.weight": torch.randn(32, 8)}
    loss = torch.tensor(4.0)
    assert fsdp_lora.compare(loss, grads, loss.clone(), {k: v.clone() for k, v in grads.items()}) == []
    wrong = {k: v.clone() for k, v in grads.items()}
    wrong["a.lora_B.weight"][3, 1] += 1.0
    problems = fsdp_lora.compare(loss, grads, loss + 0.5, wrong)
    assert len(problems) == 2 and problems[0].startswith("loss") and "a.lora_B.weight" in problems[1], problems
