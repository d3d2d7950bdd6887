"""The ingest stage: see stage.py."""

from stages.ingest.stage import STAGE

__all__ = ["STAGE"]
