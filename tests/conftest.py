"""Fixtures for every test. pytest imports this file with tests/ put first on sys.path (no __init__.py here: its
default "prepend" import mode), so the tests in tests/kernels/ import the shared helpers (helpers.py, tiny_models.py,
moe_blocks.py) as the tests here do, run alone or with the rest."""

import pytest
import torch
import transformers

from graph_moe.report import reset_counters

# The tests here (and in graph_moe/kernels/) are written against transformers 4.57; under 5.x only tests/transformers5 applies.
collect_ignore_glob = ["test_*.py", "kernels/test_*.py"] if int(transformers.__version__.split(".")[0]) >= 5 else []


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch, with the capture settings the range loop needs."""
    torch._dynamo.reset()
    reset_counters()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        yield
    torch._dynamo.reset()


@pytest.fixture
def traced(monkeypatch):
    """(bodies traced, marked as traced once) of every expert loop the pass is given (passes/traced_once.py)."""
    import graph_moe.passes as passes

    seen, find = [], passes.find_loop_candidates

    def spy(graph):
        found = find(graph)
        seen.extend((len(c.steps), c.marker is not None) for c in found)
        return found
    monkeypatch.setattr(passes, "find_loop_candidates", spy)
    return seen
