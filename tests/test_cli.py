"""The command line and the entry point, as a user calls them (fresh processes)."""

import subprocess
import sys

import pytest


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", ["demo", "explain", "dump", "bench"])
def test_help(command):
    proc = _run("-m", "graph_moe", command, "--help")
    assert proc.returncode == 0 and "usage: graph-moe" in proc.stdout


def test_explain_cli_reports_each_loop():
    proc = _run("-m", "graph_moe", "explain", "--model", "mixtral", "--layers", "2", "--experts", "4",
                "--hidden", "32", "--intermediate", "32", "--tokens", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("-> grouped GEMMs") == 2 and "2 of 2 loop(s) rewritten" in proc.stdout


def test_backend_name_works_without_importing_graph_moe():
    """`backend="graph_moe"` resolves through the torch_dynamo_backends entry point."""
    code = """
import torch
torch._dynamo.config.capture_dynamic_output_shape_ops = True
import sys; sys.path.insert(0, "tests")
assert "graph_moe" not in sys.modules
from moe_blocks import RangeMoE
m = RangeMoE(num_experts=4, top_k=2).to(torch.bfloat16)
x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
out = torch.compile(m, backend="graph_moe")(x)
from torch._dynamo.utils import counters
assert counters["graph_moe"]["loops_rewritten"] == 1, counters["graph_moe"]
torch.testing.assert_close(out.float(), m(x).float(), atol=3e-2, rtol=3e-2)
print("ok")
"""
    proc = _run("-c", code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
