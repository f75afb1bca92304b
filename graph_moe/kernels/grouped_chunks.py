"""torch._grouped_mm over more groups than one kernel call takes.

The CUDA kernel of torch._grouped_mm (CUTLASS, sm90/sm100) refuses 1024 groups or more ("Can't process
more than 1024 groups"), and its weight-gradient form has the same limit. A block with 1024+ experts is
therefore run as several calls, each over fewer than 1024 consecutive experts.

Rows are sorted by expert, so the rows of experts [first, last) are one contiguous range [start, end) whose
bounds are offsets read on the device. Slicing that range would need them on the host (a sync and a
data-dependent shape); instead each call gets all S rows, gathered so that the range starts at row 0, with
offsets shifted by `start`. The kernel computes only rows below its last offset; the rows past it are
uninitialized in its output and in its input gradient, so both are masked out with `torch.where` (a
select: a NaN in the masked rows cannot leak, as it would through a multiplication by zero).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Most groups one torch._grouped_mm call takes, per device type; devices not listed have no limit (the CPU
# kernel loops over groups). The pass reads this when it emits the grouped GEMMs.
MAX_GROUPS: dict[str, int] = {"cuda": 1023}


def groups_per_call(x: Tensor, w: Tensor) -> int | None:
    """How many groups each call may take when the (E, out, in) weights `w` need more than one call on the
    device of the rows `x`; None when one call takes them all."""
    limit = MAX_GROUPS.get(x.device.type)
    if limit is None or w.shape[0] <= limit:
        return None
    return limit


def grouped_mm_in_chunks(x: Tensor, w_t: Tensor, offs: Tensor, per_call: int) -> Tensor:
    """torch._grouped_mm(x, w_t, offs=offs), as one call per `per_call` consecutive groups.

    x (S, K) rows sorted by group; w_t (G, K, N); offs (G,) int32 end offsets with offs[-1] == S.
    No host sync, static shapes; autograd flows through the gathers, the masks and the kernel.
    """
    rows, groups = x.shape[0], w_t.shape[0]
    pos = torch.arange(rows, device=x.device)
    out = None
    for first in range(0, groups, per_call):
        last = min(first + per_call, groups)
        end = offs[last - 1]
        if first == 0:
            mine = (pos < end).unsqueeze(-1)
            part = torch._grouped_mm(torch.where(mine, x, 0), w_t[:last], offs=offs[:last])
            part = torch.where(mine, part, 0)
        else:
            start = offs[first - 1]
            # the chunk's rows moved to the front: row p of the call is row p + start of x
            mine = (pos < end - start).unsqueeze(-1)
            rotated = torch.where(mine, x[(pos + start).clamp_max(rows - 1)], 0)
            chunk = torch.where(mine, torch._grouped_mm(rotated, w_t[first:last], offs=offs[first:last] - start), 0)
            # and back: row p of x is row p - start of the call (rows past `end` read masked zeros)
            part = torch.where((pos >= start).unsqueeze(-1), chunk[(pos - start).clamp_min(0)], 0)
        out = part if out is None else out + part  # each row is non-zero in exactly one part
    return out


__all__ = ["MAX_GROUPS", "groups_per_call", "grouped_mm_in_chunks"]
