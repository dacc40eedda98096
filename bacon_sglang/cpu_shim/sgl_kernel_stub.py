"""Pure-PyTorch stand-in for the CUDA-only ``sgl_kernel`` package (CPU dev/test shim).

Loaded under the name ``sgl_kernel`` by :mod:`bacon_sglang.cpu_shim` on machines without a
CUDA device. It provides:

* the Python-level names SGLang's CPU code paths import (``assign_req_to_token_pool_cpu``);
* a ``torch.ops.sgl_kernel`` namespace in which every ``*_cpu`` op SGLang references, plus
  ``flash_attn_varlen_func``, resolves. Ops SGLang never calls on the native CPU path raise
  ``NotImplementedError`` naming the op. Any other name is absent (``hasattr`` is False), so
  SGLang's ``register_fake_if_exists`` and its AMX detection
  (``hasattr(torch.ops.sgl_kernel, "convert_weight_packed")``) keep every layer on the
  native PyTorch path.
"""

from __future__ import annotations

import torch

from bacon_sglang.cpu_shim import sgl_kernel_ops

__version__ = "0.0.0+bacon-cpu-shim"

# Every ``torch.ops.sgl_kernel.*_cpu`` name SGLang 0.5.23 references, and flash_attn_varlen_func.
_OP_NAMES = (
    "apply_multidimensional_rope_cpu apply_rotary_pos_emb_cpu biased_grouped_topk_cpu bmm_cpu "
    "conv3d_embed_cpu decode_attention_cpu extend_attention_cpu fp8_per_tensor_scaled_mm_cpu "
    "fp8_scaled_mm_cpu fused_add_rmsnorm_cpu fused_dual_residual_rmsnorm_cpu fused_experts_cpu "
    "fused_gdn_gating_cpu fused_input_proj_cpu fused_moe_router_cpu fused_norm_scale_shift_cpu "
    "fused_qk_gemma_rmsnorm_cpu fused_qk_gemma_rmsnorm_with_gate_cpu fused_qk_norm_cpu "
    "fused_qk_norm_rope_cpu fused_qk_rmsnorm_apply_from_stats_cpu fused_qk_rmsnorm_cpu "
    "fused_qk_rmsnorm_sumsq_cpu fused_qkvzba_split_reshape_cat_contiguous_cpu "
    "fused_qkvzba_split_reshape_cat_cpu fused_rmsnorm_gated_cpu "
    "fused_scale_residual_norm_scale_shift_cpu fused_scale_shift_cpu "
    "fused_sigmoid_gating_delta_rule_update_cpu fused_sigmoid_mul_cpu gelu_and_mul_cpu "
    "gelu_tanh_and_mul_cpu gemma3_rmsnorm_cpu gemma4_rmsnorm_cpu gemma_fused_add_rmsnorm_cpu "
    "gemma_rmsnorm_cpu grouped_topk_cpu image_preprocess_cpu int4_scaled_mm_cpu l2norm_cpu "
    "layernorm_cpu multimodal_rotary_embedding_cpu murmur_hash32_cpu rmsnorm_cpu "
    "rotary_embedding_cpu shared_expert_cpu silu_and_mul_cpu store_cache_cpu topk_sigmoid_cpu "
    "topk_softmax_cpu flash_attn_varlen_func"
).split()


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    batch_size: int,
) -> None:
    """``req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]] = next slots of
    out_cache_loc``, request by request (the CPU op SGLang's allocation module imports)."""
    pos = 0
    for i in range(batch_size):
        row = int(req_pool_indices[i])
        start, end = int(start_offset[i]), int(end_offset[i])
        req_to_token[row, start:end] = out_cache_loc[pos : pos + end - start].to(req_to_token.dtype)
        pos += end - start


# Python-level ``from sgl_kernel import X_cpu`` names of SGLang's CPU code paths (speculative
# decoding and KV-move helpers) that the native CPU path never calls.
_MODULE_NAMES_NOT_IMPLEMENTED = (
    "assign_draft_cache_locs_contiguous_cpu assign_extend_cache_locs_cpu "
    "build_draft_decode_metadata_cpu build_tree_kernel_efficient_cpu "
    "copy_all_layer_kv_cache_cpu fill_accept_out_cache_loc_cpu fill_bonus_tokens_cpu "
    "rotate_input_ids_cpu sgl_build_tree_kernel_efficient_cpu sgl_verify_tree_greedy_cpu "
    "verify_tree_greedy_cpu"
).split()


def _silu_and_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    return sgl_kernel_ops.silu_and_mul(x)


def _rmsnorm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return sgl_kernel_ops.rmsnorm(x, weight, eps)


_IMPLEMENTED = {
    "silu_and_mul_cpu": _silu_and_mul_cpu,
    "rmsnorm_cpu": _rmsnorm_cpu,
}
WHY = (
    "bacon-sglang's CPU shim stands in for the CUDA-only sgl_kernel package and implements "
    "only the ops SGLang's native CPU path calls. Run on a GPU machine with the real sgl_kernel."
)


def _not_implemented(name: str):
    return sgl_kernel_ops.not_implemented(name, WHY)


class _OpNamespace:
    """The ``torch.ops.sgl_kernel`` stand-in: only the names in ``_OP_NAMES`` exist."""

    def __init__(self) -> None:
        for name in _OP_NAMES:
            fn = _IMPLEMENTED.get(name) or _not_implemented(name)
            fn.default = fn  # type: ignore[attr-defined]  # like an OpOverloadPacket
            setattr(self, name, fn)

    def __repr__(self) -> str:
        return "<torch.ops.sgl_kernel (bacon-sglang CPU shim)>"


for _name in _MODULE_NAMES_NOT_IMPLEMENTED:
    globals()[_name] = _not_implemented(_name)


def install_torch_ops() -> None:
    """Bind ``torch.ops.sgl_kernel`` to the stand-in namespace (idempotent)."""
    if not isinstance(torch.ops.__dict__.get("sgl_kernel"), _OpNamespace):
        torch.ops.sgl_kernel = _OpNamespace()
