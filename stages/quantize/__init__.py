"""The quantize stage: see stage.py."""

from stages.quantize.stage import STAGE

__all__ = ["STAGE"]
