"""Pallas paged-attention kernels (decode and ragged prefill+decode) with references."""

from kernels_pallas._checks import compiled_kernel_supported
from kernels_pallas.paged_decode import paged_attention
from kernels_pallas.paged_decode import paged_attention_reference
from kernels_pallas.paged_ragged import ragged_paged_attention
from kernels_pallas.paged_ragged import ragged_paged_attention_reference

__all__ = [
    "compiled_kernel_supported",
    "paged_attention",
    "paged_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
]
