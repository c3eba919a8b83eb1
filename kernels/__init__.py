"""Triton kernels of rewardserve, one op per file, each beside its PyTorch reference."""
