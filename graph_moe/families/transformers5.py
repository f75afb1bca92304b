"""transformers 5.x `@use_experts_implementation` experts classes with the eager implementation."""

from __future__ import annotations

FAMILIES = {}  # filled in by the issue-4 work
