"""
Benchmarks for dwtrust, run side by side with their references.

Run them all with ``benchmarks/run`` (``--quick`` for a short pass).  They are
not unit tests: pytest does not collect them, and nothing asserts a timing.
"""
