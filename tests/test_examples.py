"""The examples run as a user would run them (eager / aot_eager inner compilers keep CI short)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script,inner,flags", [("quickstart.py", "eager", []), ("lora_finetune.py", "aot_eager", []),
                                                 ("qlora_finetune.py", "aot_eager", ["--whole-4bit-stacks"]),
                                                 ("trainer_finetune.py", "aot_eager", []),
                                                 ("trl_sft.py", "aot_eager", [])])
def test_example_runs(script, inner, flags):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), "--inner", inner,
                           "--steps", "2", *flags], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 1: loss" in proc.stdout
    assert "'loops_rewritten': 0" not in proc.stdout and "loops_rewritten" in proc.stdout


def test_generate_example_gives_eager_tokens_with_two_graphs():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "generate.py"), "--inner", "aot_eager",
                           "--layers", "6", "--new-tokens", "4"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 layers: 2 compiled graph(s); tokens equal to eager: True" in proc.stdout


def test_unsloth_example_explains_itself_without_unsloth():
    """The Unsloth example needs a GPU and Unsloth to run; its --help works anywhere."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "unsloth_qlora.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "graph_moe.integrations.unsloth.enable()" in proc.stdout and "--no-graph-moe" in proc.stdout
