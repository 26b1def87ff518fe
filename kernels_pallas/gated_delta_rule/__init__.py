"""Pallas kernels of the chunkwise gated delta rule (the serial inter-chunk scan, forward and backward)."""
from kernels_pallas.gated_delta_rule.chunk_scan import chunk_scan_pallas

__all__ = ["chunk_scan_pallas"]
