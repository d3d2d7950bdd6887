"""The quality stage: see stage.py."""

from stages.quality.stage import STAGE

__all__ = ["STAGE"]
