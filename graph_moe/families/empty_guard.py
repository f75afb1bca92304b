"""Form R′ (PhiMoE, Jamba, DBRX): the range loop with an empty-expert guard."""

from __future__ import annotations

FAMILIES = {}  # filled in by the issue-4 work
