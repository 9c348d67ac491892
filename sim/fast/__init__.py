"""The fast engine (sim.fast.engine) and its compiled loop (sim.fast.kernel)."""
