"""Triton kernels, one module per op; imported only when the triton backend is used."""
