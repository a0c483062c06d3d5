"""`python -m qcompile ...` runs the command line (qcompile.cli)."""
import sys

from .cli import main

sys.exit(main())
