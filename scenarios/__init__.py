"""Concord scenarios: PettingZoo ParallelEnvs on real simulators, one package per domain."""
