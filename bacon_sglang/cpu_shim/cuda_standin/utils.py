"""``sgl_kernel.utils`` of the CUDA stand-in."""

from bacon_sglang.cpu_shim.sgl_kernel_ops import is_arch_support_pdl

__all__ = ["is_arch_support_pdl"]
