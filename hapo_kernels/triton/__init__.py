"""Triton kernels: run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
