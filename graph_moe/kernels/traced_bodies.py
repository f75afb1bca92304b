"""Custom ops whose bodies AOTAutograd traces into, as `torch.library.triton_op` does: under torch.compile Inductor
sees the body's torch ops (and launches its Triton kernels from its own code); run eagerly, the body is the op's own
kernel. row_order.py, swiglu.py and router_topk.py define their ops this way.
"""

from __future__ import annotations

from torch._subclasses.functional_tensor import FunctionalTensorMode


def traced_into(op, body):
    """`body` as the op's fake kernel and as what AOTAutograd records below autograd (after the gradient above)."""
    op.register_fake(body)

    @op.register_torch_dispatch(FunctionalTensorMode)
    def _decompose(mode, _op, types, args, kwargs):
        with mode:
            return body(*args, **kwargs)


def run_eagerly(body, *args):
    """`body` called as the op's own (eager) kernel: a Triton kernel it launches through wrap_triton runs directly, as
    torch.library.triton_op does; traced (`traced_into`), Inductor launches it from its own code."""
    from torch._library.triton import set_wrap_triton_enabled

    with set_wrap_triton_enabled(False):
        return body(*args)


__all__ = ["traced_into", "run_eagerly"]
