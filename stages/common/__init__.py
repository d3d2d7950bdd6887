"""Helpers shared by several stages (never stage logic itself)."""
