"""``python -m aal ...`` is the same as the ``aal`` command (also under torchrun)."""

import sys

from aal.cli import main

sys.exit(main())
