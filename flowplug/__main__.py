"""``python -m flowplug``: the ``flowplug`` command."""

import sys

from .cli import main

sys.exit(main())
