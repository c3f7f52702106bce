"""Portable Triton kernels for triton-ascend and CUDA Triton, each paired with a torch reference.

Imports nothing of ascend-serve's own packages
(dependency direction: operator -> runtime -> kernels).
"""

__version__ = "0.1.0"
