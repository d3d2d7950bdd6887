"""The decontaminate stage: see stage.py."""

from stages.decontaminate.stage import STAGE

__all__ = ["STAGE"]
