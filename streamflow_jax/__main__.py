import sys

from streamflow_jax.cli import main

sys.exit(main())
