"""`python -m vetd` runs the daemon, as the `vetd` command does."""

from .cli import main

raise SystemExit(main())
