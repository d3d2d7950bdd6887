"""The evaluate stage: see stage.py."""

from stages.evaluate.stage import STAGE

__all__ = ["STAGE"]
