"""
C{python -m dwtrust.cli}: the C{dwtrust} command.
"""

import sys

from . import main

sys.exit(main())
