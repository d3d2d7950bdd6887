"""The pii stage: see stage.py."""

from stages.pii.stage import STAGE

__all__ = ["STAGE"]
