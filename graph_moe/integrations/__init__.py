"""Integrations with training stacks that own the model's compile (Unsloth)."""
