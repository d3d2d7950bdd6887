"""The align stage: see stage.py."""

from stages.align.stage import STAGE

__all__ = ["STAGE"]
