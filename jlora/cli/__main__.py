"""``python -m jlora.cli``: the ``jlora`` command."""
import sys

from jlora.cli import main

if __name__ == "__main__":
  sys.exit(main())
