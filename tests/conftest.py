import pytest
import torch
import transformers

from graph_moe.report import reset_counters

# The tests here are written against transformers 4.57; under 5.x only tests/transformers5 applies.
collect_ignore_glob = ["test_*.py"] if int(transformers.__version__.split(".")[0]) >= 5 else []


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
