"""``python -m tuneforge``: the same CLI as the ``tuneforge`` script (torchrun starts ranks this way)."""

import sys

from tuneforge.cli import main

if __name__ == "__main__":
    sys.exit(main())
