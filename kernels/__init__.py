"""rewardserve.kernels: one op per file, each a Triton kernel (CUDA) beside its PyTorch reference
(tests, benchmarks and CPU serving), plus the compiled C++ CPU attention (attention_cpu).

Importing this package or any op file never needs Triton: see `_triton`.
"""
