"""`python -m ringlet …` is the `ringlet` command line."""

from ringlet.cli import main

raise SystemExit(main())
