"""`python -m radixserve ...`: the CLI without the console script (e.g. a checkout on PYTHONPATH
that was never pip-installed, as on the GPU machine: see bench/device_suite.sh)."""

import sys

from radixserve.cli import main

sys.exit(main())
