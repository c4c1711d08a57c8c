"""Sampling: the MSD/MultiDiffusion math on tensors (sampler), window grids (windows), the plan of a run in pure
Python (plan) and the sphere's pole caps (sphere)."""
