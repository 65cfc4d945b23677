"""``python -m agent``: the same as the ``zonewatch-agent`` executable."""

import sys

from agent.entry import main

sys.exit(main())
