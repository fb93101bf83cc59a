"""Analyses of trained checkpoints (routing)."""
