"""Pallas kernels with references: paged attention (decode, ragged) and N:M sparse matmul."""

from kernels_pallas._checks import compiled_kernel_supported
from kernels_pallas.paged_decode import paged_attention
from kernels_pallas.paged_decode import paged_attention_reference
from kernels_pallas.paged_ragged import ragged_paged_attention
from kernels_pallas.paged_ragged import ragged_paged_attention_reference
from kernels_pallas.sparse_matmul import nm_sparse_matmul
from kernels_pallas.sparse_matmul import nm_sparse_matmul_reference
from kernels_pallas.sparse_matmul import nm_sparse_to_dense

__all__ = [
    "compiled_kernel_supported",
    "nm_sparse_matmul",
    "nm_sparse_matmul_reference",
    "nm_sparse_to_dense",
    "paged_attention",
    "paged_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
]
