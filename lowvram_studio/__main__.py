"""`python -m lowvram_studio` is the `lowvram-studio` command."""

import sys

from .cli import main

sys.exit(main())
