"""`python -m xctsam.cli`: the console script run as a module."""

import sys

from xctsam.cli.root import main

if __name__ == "__main__":
    sys.exit(main())
