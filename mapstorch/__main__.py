"""``python -m mapstorch``: the same as the ``mapstorch`` command."""

import sys

from mapstorch.cli.main import main

sys.exit(main())
