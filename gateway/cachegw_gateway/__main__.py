"""python -m cachegw_gateway: the same as `cachegw serve`."""

import sys

from cachegw_gateway.main import main

sys.exit(main())
