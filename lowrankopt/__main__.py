"""``python -m lowrankopt``: the ``lowrankopt`` command."""

from .cli import main

raise SystemExit(main())
