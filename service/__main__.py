"""``python -m service ...`` is ``bonn-sweep ...``."""

import sys

from service.cli import main

sys.exit(main())
