"""KV-cache compression policies: one small frozen dataclass per method.

A new method is one new module here plus one entry in :data:`POLICIES`.
"""

from __future__ import annotations

from collections.abc import Sequence

from bacon_sglang.policies.adakv import AdaKV
from bacon_sglang.policies.bacon import BACON
from bacon_sglang.policies.base import Policy, RequestState
from bacon_sglang.policies.pyramidkv import PyramidKV
from bacon_sglang.policies.snapkv import SnapKV
from bacon_sglang.policies.sparsemm import SparseMM

POLICIES: dict[str, type[Policy]] = {
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "adakv": AdaKV,
    "sparsemm": SparseMM,
    "bacon": BACON,
}


def make_policy(
    name: str, pool_kernel: int = 5, head_scores: Sequence[Sequence[float]] = ()
) -> Policy:
    """Build a policy by name with default hyperparameters.

    Args:
        name: ``snapkv``, ``pyramidkv``, ``adakv``, ``sparsemm``, ``bacon`` (=
            ``BACON(base=SnapKV())``), or ``bacon-<base>`` for BACON around another base, e.g.
            ``bacon-adakv``.
        pool_kernel: avg-pool kernel of the window score (and of BACON's last-query score).
        head_scores: SparseMM's visual-head scores ``[L][Hkv]``
            (:func:`bacon_sglang.models.visual_heads.load`); required by ``sparsemm`` and
            ``bacon-sparsemm``, unused by the others.

    Returns:
        The policy.
    """
    key = name.strip().lower()
    if key == "bacon":
        key = "bacon-snapkv"
    if key.startswith("bacon-"):
        return BACON(base=make_policy(key.removeprefix("bacon-"), pool_kernel, head_scores))
    if key not in POLICIES or key == "bacon":
        known = sorted([*POLICIES, *(f"bacon-{k}" for k in POLICIES if k != "bacon")])
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(known)}")
    if key != "sparsemm":
        return POLICIES[key](pool_kernel=pool_kernel)
    if not head_scores:
        raise ValueError(f"policy {name!r} needs the model's visual-head scores (head_scores)")
    scores = tuple(tuple(float(s) for s in row) for row in head_scores)
    return SparseMM(pool_kernel=pool_kernel, head_scores=scores)


__all__ = [
    "AdaKV",
    "BACON",
    "POLICIES",
    "Policy",
    "PyramidKV",
    "RequestState",
    "SnapKV",
    "SparseMM",
    "make_policy",
]
