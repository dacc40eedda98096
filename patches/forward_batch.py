"""Hook on ``sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new``.

After compaction a request holds ``P + kept`` prompt slots but its prompt was ``L`` tokens
long, and the kept keys carry their original rotary positions. SGLang derives decode
positions from the KV length (``positions = seq_lens - 1``; Qwen2-VL's mrope:
``mrope_position_delta - 1 + seq_lens``), so for a compressed request they would restart
too low. This AFTER hook rewrites them for decode batches from the logical length
``seq_lens + offset`` (``offset = L - P - kept``, set on the request by the scheduler hook):

* ``positions = seq_lens + offset - 1``;
* mrope models: ``mrope_positions = (delta - 1 + seq_lens + offset)`` on all three axes. It
  is recomputed rather than offset: with a short KV, SGLang's own decode path mistakes the
  request for one with precomputed decode positions (``mm.mrope_positions.shape[1] >=
  seq_len``) and would return a *prompt* position.

CUDA-graph decode copies ``positions`` / ``mrope_positions`` from the ForwardBatch into its
static buffers at replay, so graphs need no recapture.
"""

from __future__ import annotations

import torch


def position_offsets(reqs) -> list[int] | None:
    """Per-request position offsets, or None when no request of the batch is compressed."""
    offsets = [getattr(r, "bacon_position_offset", 0) for r in reqs]
    return offsets if any(offsets) else None


def after_init_new(fb, cls, batch, model_runner, *args, **kwargs):
    """AFTER ``ForwardBatch.init_new(cls, batch, model_runner, ...)`` (classmethod)."""
    if not fb.forward_mode.is_decode() or batch.reqs is None:
        return fb
    offsets = position_offsets(batch.reqs)
    if offsets is None:
        return fb
    device = fb.seq_lens.device
    logical = fb.seq_lens.to(torch.int64) + torch.tensor(offsets, dtype=torch.int64).to(device)
    fb.positions = (logical - 1).clamp_min(0).to(fb.positions.dtype)
    if fb.mrope_positions is not None:
        deltas = []
        for mm in batch.multimodal_inputs or [None] * len(batch.reqs):
            delta = getattr(mm, "mrope_position_delta", None) if mm is not None else None
            deltas.append(int(delta.item()) if delta is not None else 0)
        positions_1d = torch.tensor(deltas, dtype=torch.int64).to(device) - 1 + logical
        fb.mrope_positions = positions_1d.unsqueeze(0).repeat(3, 1)
    return fb


HOOKS = [
    (
        "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
        after_init_new,
        "AFTER",
    ),
]
