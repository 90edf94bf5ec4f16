"""`python -m moshi_fast` runs the `moshi-fast` command line."""
from .cli import main

raise SystemExit(main())
