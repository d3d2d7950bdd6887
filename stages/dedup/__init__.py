"""The dedup stage: see stage.py."""

from stages.dedup.stage import STAGE

__all__ = ["STAGE"]
