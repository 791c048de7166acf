"""``python -m ibp``: the ibp command (see ibp.cli)."""
import sys

from .cli import main

sys.exit(main())
