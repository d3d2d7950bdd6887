"""``python -m llmpipe`` is the ``llmpipe`` command."""

import sys

from llmpipe.cli import main

sys.exit(main())
