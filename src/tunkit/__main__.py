"""``python -m tunkit``: the command line."""

from tunkit.cli import main

raise SystemExit(main())
