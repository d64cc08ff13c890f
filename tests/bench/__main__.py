"""``python -m tests.bench``: run the benchmarks (see tests/bench/run.py)."""

from .run import main

raise SystemExit(main())
