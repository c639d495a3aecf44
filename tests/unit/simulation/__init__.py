"""A deterministic simulation of the refresh protocol: the real app code on in-memory stand-ins, a virtual clock
and a seeded scheduler that explores interleavings, faults and crashes (docs/simulation.md)."""
