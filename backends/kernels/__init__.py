"""The kernel generators' target-neutral layer, shared by the numba-cpu and numba-cuda backends:
writing source (source.py), the pointwise expression engine and its rules (pointwise.py),
reduction accumulators (reduction.py), library-kernel references and epilogues (library.py).
What differs between the targets reaches it as a `KernelTarget`; nothing here imports a
backend, so loading one backend loads nothing of the other.
"""
