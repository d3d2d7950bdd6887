"""The pretrain stage: see stage.py."""

from stages.pretrain.stage import STAGE

__all__ = ["STAGE"]
