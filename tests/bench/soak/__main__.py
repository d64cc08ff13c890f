"""``python -m tests.bench.soak``: the soak run (see tests/bench/soak/run.py)."""

from .run import main

raise SystemExit(main())
