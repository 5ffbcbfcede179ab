"""`python -m iobridge`: the same as the `iobridge` command."""
import sys

from .cli import main

sys.exit(main())
