"""Helpers shared by the tests, one module per concern; test modules import from here, never from
one another or from conftest.py (which holds fixtures and pytest hooks only).

- cli.py: running `lmforge` in a fresh process or under torchrun, the tiny run's arguments, a
  run's metrics;
- spawn.py: a function on several gloo ranks started in-process;
- parity.py: a run's final weights against one process's;
- checkpoint.py: a small trained model and optimizer, and optimizer-state equality;
- config.py: a small layout's overrides and the one-line check of a parallel-layout rule;
- offline.py: sockets blocked for a test (every connect and DNS lookup raises);
- worker_gate.py: the locks that let `timed` tests run alone under pytest-xdist (tests/conftest.py).
"""
