"""``python -m slmkit``: the same as the ``slmkit`` command."""

import sys

from slmkit.cli import main

sys.exit(main())
