"""`python -m m3jax <command> ...`: see m3jax/cli/main.py."""
import sys

from m3jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
