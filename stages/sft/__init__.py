"""The sft stage: see stage.py."""

from stages.sft.stage import STAGE

__all__ = ["STAGE"]
