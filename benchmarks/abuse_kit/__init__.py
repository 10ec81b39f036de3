"""Helpers of ``benchmarks/abuse.py``: the victim process, the attacks, raw wire access."""
