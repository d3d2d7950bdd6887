"""The eleven lifecycle stages, one package each (``stages/<name>/``, whose ``__init__`` exports ``STAGE``),
and ``stages/common/`` for what several of them share. ``llmpipe/project.py`` lists them."""
