"""The development kit: what the tests, the demo, the lab and the benchmarks share (the
cluster simulator, planning instances, the real servers they start). Not part of the
distribution."""
