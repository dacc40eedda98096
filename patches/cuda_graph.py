"""Which of SGLang 0.5.23's execution paths compression can run on (graphs, attention
backends), checked at launch, and what a scheduler actually runs (``GET /server_info``).

The compression runs in the AFTER hook on ``AttentionBackend.forward``
(``patches/attention.py``): at every layer of a prefill forward, one copy of the planned
requests' window query rows into the forward's buffer; after the last layer, the pass
(scores of every layer, calibration, selection, compaction: a constant number of launches,
nothing read back). Both are Python that must run on the real query rows. Decode needs no
hook inside the model: its positions, ``seq_lens`` and ``req_pool_indices`` come from the
``ForwardBatch`` (``patches/forward_batch.py``, ``patches/scheduler.py``), which every decode
graph runner copies into its static buffers before each replay. So, per path:

* decode CUDA graphs (``full``, ``breakable``), with or without ``--enable-torch-compile``,
  and the CPU graph runner (``torch.compile``, decode only): supported; the attention hook
  is a no-op in decode (it returns before touching anything when no extend plan is set).
* the ``breakable`` prefill graph (SGLang's default on CUDA for text models; off by default
  for Qwen2-VL / LLaVA, not on SGLang's multimodal allow-list): supported; attention runs
  eagerly between captured segments (``RadixAttention._eager_attention``), so the hook runs
  per layer on the real rows ``q[:n]``.
* the ``full`` prefill graph: **refused**. Attention (and the hook with it) is captured
  into one CUDA graph; a replay runs no Python, so no scoring and no compaction would
  happen while the scheduler still frees the "evicted" slots.
* piecewise (``tc_piecewise``) prefill graphs: removed from SGLang 0.5.23 (its parser rejects
  them), nothing to refuse.
* capturing the pass itself (issue 29, item 2): **not done**. It is eager in every supported
  path (none, SGLang's default prefill path for Qwen2-VL; breakable, where the last layer's
  attention, and the pass with it, runs between captured segments). What capture per bucket
  needs, none of it measured: shapes padded to buckets (requests to a power of two, the
  longest prompt to a bucket, window rows to ``requests x w``: the kernels already mask by
  each request's length, so padding costs only work), the small integer tables (offsets,
  lengths, selection metadata, packing columns) filled into static device buffers by one
  copy before replay instead of fresh ``to_device`` tensors, the layer offset table built
  once per pool, and the per-request views of the result (``RequestCompression.keep``) taken
  after replay. Whether it pays off is for a GPU to say: ``benchmarks/gpu_check.py --steps
  compression-cost`` reports the pass's host time next to its device time (capture can only
  remove the host part, 4-5 Triton launches and 72-128 PyTorch operations per prefill batch).
* an attention backend that overrides ``AttentionBackend.forward`` (MLA, sparse and hybrid
  linear backends, two-batch overlap): **refused**, the hook would never run. SGLang's
  ``HybridAttnBackend`` (``--prefill-attention-backend`` differing from the decode one)
  calls its prefill backend's ``forward`` and is checked through it.
"""

from __future__ import annotations

PREFILL_FULL_GRAPH = (
    "--cuda-graph-backend-prefill full (a full prefill graph replays attention without "
    "Python, so the window queries are never copied nor scored; use breakable or disabled)"
)


def prefill_graph_backend(server_args) -> str | None:
    """The resolved prefill graph backend of ``server_args`` (``full``, ``breakable``,
    ``disabled``; SGLang's resolution, as the scheduler receives it), or None before
    resolution."""
    from sglang.srt.arg_groups.overrides import resolution_result

    config = resolution_result(server_args, "cuda_graph_config")
    if isinstance(config, dict):
        return (config.get("prefill") or {}).get("backend")
    return getattr(getattr(config, "prefill", None), "backend", None)


def forward_overriding_backend(attn_backend) -> str | None:
    """Name of the backend class whose ``forward`` bypasses ``AttentionBackend.forward``
    for extend batches (so the scoring hook would not run), or None when it is hooked."""
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglang.srt.layers.attention.hybrid_attn_backend import HybridAttnBackend

    if isinstance(attn_backend, HybridAttnBackend):
        return forward_overriding_backend(attn_backend.prefill_backend)
    if type(attn_backend).forward is not AttentionBackend.forward:
        return type(attn_backend).__name__
    return None


def refused_execution_paths(scheduler) -> list[str]:
    """The options of ``scheduler``'s launch that compression cannot run under, one short
    reason each (empty when all is fine). Called from ``patches/scheduler.unsupported``."""
    problems = []
    if prefill_graph_backend(scheduler.server_args) == "full":
        problems.append(PREFILL_FULL_GRAPH)
    model_runner = getattr(getattr(scheduler, "tp_worker", None), "model_runner", None)
    attn_backend = getattr(model_runner, "attn_backend", None)
    if attn_backend is not None:
        name = forward_overriding_backend(attn_backend)
        if name is not None:
            problems.append(
                f"attention backend {name} (it overrides AttentionBackend.forward, "
                "where the per-layer scoring runs)"
            )
    return problems


def execution_paths(scheduler) -> dict:
    """What ``scheduler``'s model runner really runs: the attention backend class (the
    prefill one for a hybrid backend), the decode graph runner and prefill graph runner
    classes (None when eager); empty for a worker without a model runner."""
    model_runner = getattr(getattr(scheduler, "tp_worker", None), "model_runner", None)
    if model_runner is None:
        return {}
    backend = model_runner.attn_backend
    prefill_backend = getattr(backend, "prefill_backend", backend)
    decode = getattr(model_runner, "decode_cuda_graph_runner", None)
    if decode is getattr(model_runner, "eager_runner", object()):
        decode = None
    prefill = getattr(model_runner, "prefill_cuda_graph_runner", None)
    if prefill is getattr(model_runner, "eager_runner", object()):
        prefill = None
    return {
        "attention_backend": type(prefill_backend).__name__,
        "decode_graph_runner": type(decode).__name__ if decode is not None else None,
        "prefill_graph_runner": type(prefill).__name__ if prefill is not None else None,
        "prefill_graph_backend": prefill_graph_backend(scheduler.server_args),
    }


def after_get_internal_state(result, scheduler, *args, **kwargs):
    """AFTER ``Scheduler.get_internal_state``: adds ``bacon_execution`` (see
    :func:`execution_paths`) to the scheduler's entry of ``GET /server_info``."""
    result.internal_state["bacon_execution"] = execution_paths(scheduler)
    return result


HOOKS = [
    (
        "sglang.srt.managers.scheduler.Scheduler.get_internal_state",
        after_get_internal_state,
        "AFTER",
    ),
]
