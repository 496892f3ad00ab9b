"""``python -m isreshape_cli <subcommand>``."""

from .main import main

raise SystemExit(main())
