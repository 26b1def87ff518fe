"""Pallas kernel of the ternary (2-bit packed) matmul."""
from kernels_pallas.ternary_matmul.kernel import ternary_matmul_pallas

__all__ = ["ternary_matmul_pallas"]
