"""``python -m trdq_jax.cli``: the same as the ``trdq`` command."""
import sys

from trdq_jax.cli import main

sys.exit(main())
