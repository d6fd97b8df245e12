"""Allow ``python -m abliterate``."""

from abliterate.cli import main

raise SystemExit(main())
