"""Benchmarks: mirror against distribution's proxy mode, nginx and no mirror.

Not a test suite: nothing here is named ``test_*``, so ``python -m pytest``
never collects it. Run it with ``python -m tests.bench`` (``--quick`` for a
two-minute pass); docs/benchmarks.md says what each scenario measures. It
reuses the integration harness (``tests/integration``) for the upstream
registry, generated images, skopeo and the mirror subprocess.
"""
