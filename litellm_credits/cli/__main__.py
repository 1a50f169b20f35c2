"""``python -m litellm_credits.cli``: the same as the ``litellm-credits`` command."""

import sys

from . import main

sys.exit(main())
