"""The serve stage: see stage.py."""

from stages.serve.stage import STAGE

__all__ = ["STAGE"]
