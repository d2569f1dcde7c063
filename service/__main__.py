"""``python -m service ...`` is ``bonn-sweep ...``."""

import sys

from service.launch.cli import main

sys.exit(main())
