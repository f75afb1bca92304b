"""Form D (DeepSeek-V3, Dots1, GLM4-MoE, GLM4V-MoE, LongCat-Flash) and form S (DeepSeek-V2)."""

from __future__ import annotations

FAMILIES = {}  # filled in by the issue-4 work
