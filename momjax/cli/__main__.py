"""`python -m momjax.cli`: the momjax command."""

import sys

from momjax.cli import main

sys.exit(main())
