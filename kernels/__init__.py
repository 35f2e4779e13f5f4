"""kvrelay.kernels."""
