"""Form G (GraniteMoe, GraniteMoeShared, GraniteMoeHybrid, JetMoE): 3D expert weights split by token counts."""

from __future__ import annotations

FAMILIES = {}  # filled in by the issue-4 work
