"""A bounded soak run: hundreds of hostile and ordinary clients against one
``mirror serve`` whose upstream is a real registry behind a shaped, faulty
network, while its memory, file descriptors, queue and connections are
sampled every second.

Not a test suite (nothing here is named ``test_*``). Run it with
``python -m tests.bench.soak [--duration 60] [--clients 300]``;
docs/soak.md says what it does, what it checks and what it found.

Modules: ``content`` (generated blobs and images, pushed to the registry),
``netem`` (a ``LatencyProxy`` in a process of its own), ``daemon`` (the
mirror subprocess and its config), ``clients`` (the client behaviours and
their outcome counts), ``faults`` (the upstream fault schedule),
``sampler`` (``/proc`` and ``/metrics`` every second), ``report`` (table,
summary, checks, JSON) and ``run`` (the order of it all, the checks, and
the CLI); ``repro_reset`` reproduces a bug the soak found.
"""
