"""`python -m normgrad`: the same as the `normgrad` command."""

from .cli import main

raise SystemExit(main())
