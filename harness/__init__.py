"""The engine: runner, comparator, tolerance, convention probe, worker processes and the CLI."""
