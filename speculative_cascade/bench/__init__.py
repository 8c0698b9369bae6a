"""Benchmark harness: methods behind one interface, a runner, JSON reports."""
