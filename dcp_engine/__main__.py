"""``python -m dcp_engine``: the ``dcp-engine`` command."""

import sys

from .cli import main

sys.exit(main())
