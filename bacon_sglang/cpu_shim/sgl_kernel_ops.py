"""Plain-PyTorch versions of the ``sgl_kernel`` ops SGLang 0.5.23 calls, shared by the CPU shim
(:mod:`bacon_sglang.cpu_shim.sgl_kernel_stub`) and the CUDA stand-in
(:mod:`bacon_sglang.cpu_shim.cuda_standin`, installed as ``sgl_kernel`` by
``benchmarks/gpu_kit.py`` on a GPU machine whose torch cannot load the real package).

Each op follows the real one's signature and in-place contract; the arithmetic follows
SGLang's own torch-native paths (``RMSNorm.forward_native``, ``GemmaRMSNorm.forward_native``,
``SiluAndMul.forward_native``, ``GeluAndMul.forward_native``): float32 inside, cast back to the
input's dtype. They are several unfused kernels each, so a forward through them is slower than
through the real CUDA kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def not_implemented(name: str, why: str):
    """A function named ``name`` that raises ``NotImplementedError`` with ``why`` when called."""

    def op(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not available: {why}")

    op.__name__ = name
    return op


def _write(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def _normed(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis times ``weight`` (Gemma: times
    ``1 + weight``), all in float32."""
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * (1.0 + weight.float()) if gemma else x * weight


def _norm_ops(gemma: bool):
    """The ``(norm, fused_add_norm)`` pair with sgl_kernel's signatures."""

    def norm(
        input: torch.Tensor,
        weight: torch.Tensor,
        eps: float = 1e-6,
        out: torch.Tensor | None = None,
        enable_pdl: bool | None = None,
    ) -> torch.Tensor:
        return _write(_normed(input, weight, eps, gemma).to(input.dtype), out)

    def fused_add_norm(
        input: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float = 1e-6,
        enable_pdl: bool | None = None,
    ) -> None:
        summed = input.float() + residual.float()
        residual.copy_(summed)
        input.copy_(_normed(summed, weight, eps, gemma))

    return norm, fused_add_norm


rmsnorm, fused_add_rmsnorm = _norm_ops(gemma=False)
rmsnorm.__doc__ = """``rmsnorm(input [..., hidden], weight [hidden], eps, out=None)``: RMSNorm times
``weight``, the product in float32, cast to ``input``'s dtype (into ``out`` if given)."""
fused_add_rmsnorm.__doc__ = """``fused_add_rmsnorm(input, residual, weight, eps)``, in place:
``residual += input`` (summed in float32), then ``input = rmsnorm(residual, weight)``."""
gemma_rmsnorm, gemma_fused_add_rmsnorm = _norm_ops(gemma=True)
gemma_rmsnorm.__doc__ = """Gemma's RMSNorm: as :func:`rmsnorm`, times ``1 + weight``."""
gemma_fused_add_rmsnorm.__doc__ = """As :func:`fused_add_rmsnorm`, with Gemma's RMSNorm."""
for _op, _name in ((rmsnorm, "rmsnorm"), (fused_add_rmsnorm, "fused_add_rmsnorm"),
                   (gemma_rmsnorm, "gemma_rmsnorm"),
                   (gemma_fused_add_rmsnorm, "gemma_fused_add_rmsnorm")):  # fmt: skip
    _op.__name__ = _op.__qualname__ = _name


def _act_and_mul(act, input: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    d = input.shape[-1] // 2
    return _write(act(input[..., :d]) * input[..., d:], out)


def silu_and_mul(
    input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool | None = None
) -> torch.Tensor:
    """``silu(input[..., :d]) * input[..., d:]`` for ``input [..., 2d]`` -> ``[..., d]``."""
    return _act_and_mul(F.silu, input, out)


def gelu_and_mul(
    input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool | None = None
) -> torch.Tensor:
    """``gelu(input[..., :d]) * input[..., d:]`` (exact erf GELU) -> ``[..., d]``."""
    return _act_and_mul(F.gelu, input, out)


def gelu_tanh_and_mul(
    input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool | None = None
) -> torch.Tensor:
    """``gelu_tanh(input[..., :d]) * input[..., d:]`` -> ``[..., d]``."""
    return _act_and_mul(lambda x: F.gelu(x, approximate="tanh"), input, out)


def _per_row(value, probs: torch.Tensor) -> torch.Tensor:
    """A scalar or ``[batch]`` tensor as a ``[batch, 1]`` column on ``probs``' device."""
    column = torch.as_tensor(value, device=probs.device).reshape(-1, 1)
    return column.expand(probs.shape[0], 1)


def top_k_renorm_prob(probs: torch.Tensor, top_k, *args, **kwargs) -> torch.Tensor:
    """``probs [batch, vocab]`` with all but each row's ``top_k`` largest set to 0,
    renormalised to sum 1 (ties at the k-th value are all kept, as the real kernel's pivot
    does). ``top_k``: int or ``[batch]``; k >= vocab keeps the row."""
    k = _per_row(top_k, probs).long().clamp(1, probs.shape[-1])
    kth = probs.sort(dim=-1, descending=True).values.gather(-1, k - 1)
    kept = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    return kept / kept.sum(-1, keepdim=True)


def top_p_renorm_prob(probs: torch.Tensor, top_p, *args, **kwargs) -> torch.Tensor:
    """``probs [batch, vocab]`` restricted to the smallest set of largest probabilities whose
    sum reaches ``top_p`` (float or ``[batch]``), renormalised to sum 1."""
    p = _per_row(top_p, probs).to(probs.dtype)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each entry
    keep_sorted = before < p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum(-1, keepdim=True)


def weak_ref_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor over the same memory as ``tensor`` (same shape, strides, offset). The real op
    holds no reference to the storage; this view does, so memory a captured graph released
    stays allocated while the view lives."""
    return tensor.detach()


def is_arch_support_pdl() -> bool:
    """Programmatic dependent launch: never used by these plain PyTorch ops."""
    return False
