"""The CUDA ``sgl_kernel`` stand-in: installed as the ``sgl_kernel`` package by
``benchmarks/gpu_kit.py`` on a GPU machine where the real ``sglang-kernel`` cannot load (its
``common_ops`` library is built against the torch SGLang 0.5.23 pins, and a machine with an
older torch lacks five of the C++ symbols it needs).

SGLang 0.5.23's CUDA path imports ``sgl_kernel`` with no torch fallback in two places
(``layers/layernorm.py`` and the w8a8 int8 quantization scheme). This package offers, in plain
PyTorch (:mod:`bacon_sglang.cpu_shim.sgl_kernel_ops`), the ops a Qwen2-VL server calls:
RMSNorm (plain and Gemma, fused with the residual add), SiLU/GELU-and-mul, the top-k/top-p
renormalisations, ``weak_ref_tensor`` and ``utils.is_arch_support_pdl``. The other names
SGLang imports at module level exist and raise ``NotImplementedError`` when called; any name
not listed is absent, so SGLang's own ``try: ... except ImportError`` fallbacks stay in force.
Server runs on it need ``SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1``, ``--attention-backend
triton``, ``--mm-attention-backend triton_attn`` and ``--sampling-backend pytorch``.
"""

from bacon_sglang.cpu_shim.sgl_kernel_ops import (
    fused_add_rmsnorm,
    gelu_and_mul,
    gelu_tanh_and_mul,
    gemma_fused_add_rmsnorm,
    gemma_rmsnorm,
    not_implemented,
    rmsnorm,
    silu_and_mul,
    top_k_renorm_prob,
    top_p_renorm_prob,
    weak_ref_tensor,
)

__version__ = "0.0.0+bacon.standin"

WHY = (
    "bacon-sglang's CUDA stand-in for sgl_kernel implements only the ops a Qwen2-VL server "
    "calls on the Triton attention backend (see benchmarks/README.md, GPU kit)"
)
# Names SGLang 0.5.23 imports from the top-level package outside try/except blocks.
NOT_IMPLEMENTED = ("int8_scaled_mm", "moe_sum", "moe_sum_reduce")
for _name in NOT_IMPLEMENTED:
    globals()[_name] = not_implemented(_name, WHY)

IMPLEMENTED = (
    "fused_add_rmsnorm", "gelu_and_mul", "gelu_tanh_and_mul", "gemma_fused_add_rmsnorm",
    "gemma_rmsnorm", "rmsnorm", "silu_and_mul", "top_k_renorm_prob", "top_p_renorm_prob",
    "weak_ref_tensor",
)  # fmt: skip
__all__ = [
    "fused_add_rmsnorm", "gelu_and_mul", "gelu_tanh_and_mul", "gemma_fused_add_rmsnorm",
    "gemma_rmsnorm", "rmsnorm", "silu_and_mul", "top_k_renorm_prob", "top_p_renorm_prob",
    "weak_ref_tensor", "int8_scaled_mm", "moe_sum", "moe_sum_reduce",
]  # fmt: skip
