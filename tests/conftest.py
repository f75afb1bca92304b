import pytest
import torch

from graph_moe.report import reset_counters


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch, with the capture settings the range loop needs."""
    torch._dynamo.reset()
    reset_counters()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        yield
    torch._dynamo.reset()
