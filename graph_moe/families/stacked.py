"""3D-weight experts in transformers 4.x: gpt-oss, Qwen3-VL-MoE, Llama4."""

from __future__ import annotations

FAMILIES = {}  # filled in by the issue-4 work
