"""Performance figures for the coordinator, each measured as a ratio to a peer in the same run.

``make bench`` (or ``python -m bench.run``) writes ``bench/results.md``. Every comparison runs
against 127.0.0.1 only, with the server under test pinned to one core and the load generator to
another (``taskset``), so that the ratios hold across machines even when absolute numbers do not.
"""
