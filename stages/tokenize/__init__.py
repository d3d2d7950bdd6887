"""The tokenize stage: see stage.py."""

from stages.tokenize.stage import STAGE

__all__ = ["STAGE"]
