"""Benchmarks behind ``marl bench NAME``; each module exposes a typer-annotated ``command``.

Every benchmark measures against a reference in the same run and prints ratios, never absolute
times alone, so figures stay comparable across machines.
"""
