"""``python -m sharpguard`` runs the ``sharpguard`` command."""

import sys

from .cli import main

sys.exit(main())
