"""Benchmarks behind ``marl bench NAME``; each module exposes a ``click.Command`` named ``command``.

Every benchmark measures against a reference in the same run and prints ratios, never absolute
times alone, so figures stay comparable across machines.
"""
