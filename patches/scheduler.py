"""Hooks on ``sglang.srt.managers.scheduler.Scheduler`` (the scheduler subprocess).

* ``Scheduler.__init__`` (AFTER): reads the config that travelled on ``ServerArgs``
  (``patches/server_args.py``), refuses what compression cannot support yet, and builds
  the process's :class:`Runtime` (pools, allocator, tree cache, policy).
* ``Scheduler.run_batch`` (AROUND): for an extend batch, plans which requests finish their
  prompt in this forward and get compressed (and bars every request that will be
  compressed from the radix tree *before* its first chunk could be inserted); runs the
  forward, during which ``patches/attention.py`` scores every layer and compacts the KV;
  then, still before the next batch is scheduled (the overlap scheduler prepares the next
  decode right after this returns), frees the evicted slots and shortens the requests' KV
  length. Doing this in ``process_batch_result`` would be one batch too late.

With ``--kv-prefix-cache full`` (the default when the radix cache is on), the plan also
allocates each finishing request a compressed copy, and after the forward the request's full
prompt goes into the radix tree as evictable cache (``patches/radix_cache.py``). With
``--kv-layout cells`` it allocates the request's cell slots instead (either prefix-cache
mode), and after the forward the row points at them (:func:`place_copy`,
``patches/cells.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bacon_sglang.cells import kept_cells, rank_heads
from bacon_sglang.compression import RequestCompression, WindowQueries, plan_request
from bacon_sglang.config import (
    HEAD_SCORE_POLICIES,
    OVERRIDE_KEY,
    RAGGED_POLICIES,
    CompressionConfig,
    ConfigError,
    policy_problem,
)
from bacon_sglang.models import visual_heads
from bacon_sglang.paged import to_device
from bacon_sglang.patches import cells, parallel, radix_cache
from bacon_sglang.patches.metrics import CompressionCounters, make_counters
from bacon_sglang.patches.server_args import config_of, scale_out_problems
from bacon_sglang.policies import Policy, make_policy
from bacon_sglang.retraction import RecomputedRows, recomputed_rows

logger = logging.getLogger(__name__)


@dataclass
class PlanEntry:
    """One request of the current extend batch that is (or will be) compressed."""

    req: object
    q_start: int  # first row of the request in the forward's flat query tensor
    q_len: int  # new tokens of the request in this forward
    window: WindowQueries | None  # None: the keep-set is known (a retracted request)
    compression: RequestCompression | None  # None: a middle chunk (queries stashed only)
    generated: int = 0  # tokens generated before a retraction, kept whole (never scored)
    # after a retraction: the rows recomputing generated tokens, attending to the kept KV
    recomputed: RecomputedRows | None = None


@dataclass(frozen=True)
class RetainedKeep:
    """What a request's compression chose, kept on the request (``req.bacon_keep``) so that
    the prefill after a retraction compacts the prompt to the same tokens."""

    prompt_len: int  # the prompt, generated tokens excluded
    prefix_len: int
    keep: torch.Tensor  # [num_layers, Hkv, kept] positions in [prefix_len, prompt_len)
    # (ragged keep-sets: KEEP_PAD past a head's own count)
    cells: int = 0  # C of the prompt with --kv-layout cells (host-known), else 0
    rank_cells: tuple[int, ...] = ()  # with tensor parallelism: every rank's C_r


@dataclass
class Runtime:
    """What the hooks of one scheduler process share."""

    config: CompressionConfig
    req_to_token_pool: object
    kv_pool: object
    tree_cache: object
    page_size: int
    num_layers: int
    num_kv_heads: int
    policies: dict[tuple[str, int], Policy] = field(default_factory=dict)
    context_len: int | None = None
    plan: list[PlanEntry] | None = None
    forward: object | None = None  # the planned forward's window buffer (patches/attention.py)
    compacting: bool = False  # the forward's compaction is under way (patches/attention.py)
    # Window queries of requests whose prompt continues in a later chunk, keyed by the
    # request object itself (never by rid: a later request may reuse an aborted one's rid).
    windows: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    compressed_requests: int = 0
    evicted_tokens: int = 0
    freed_slots: int = 0
    copies: int = 0  # compressed into a copy, full prompt left in the radix tree
    copy_fallbacks: int = 0  # a copy was asked for, the pool had no room: in place
    failures: int = 0  # compression failed for a request, served uncompressed
    cell_fallbacks: int = 0  # --kv-layout cells, no room for the cell slots: uncompressed
    retraction_reuses: int = 0  # prefills after a retraction that reused the keep-set
    counters: CompressionCounters | None = None  # Prometheus, with --enable-metrics
    # --kv-layout cells: (C, m) of each request whose row holds cells, until it gives it back
    cell_requests: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    head_scores: tuple[tuple[float, ...], ...] = ()  # --kv-head-scores (SparseMM), [L][Hkv]
    tp_size: int = 1
    tp_rank: int = 0
    # with tensor parallelism: the model's KV heads of every rank (this one's: ``kv_heads``)
    tp_heads: tuple[range, ...] = ()

    def policy(self, config: CompressionConfig) -> Policy:
        key = (config.policy, config.pool_kernel)
        if key not in self.policies:
            scores = self.head_scores if config.policy in HEAD_SCORE_POLICIES else ()
            self.policies[key] = make_policy(config.policy, config.pool_kernel, scores)
        return self.policies[key]

    @property
    def kv_heads(self) -> range | None:
        """The model's KV heads this rank's pool holds (None: all, one process)."""
        return self.tp_heads[self.tp_rank] if self.tp_heads else None


RUNTIME: Runtime | None = None


def request_config(runtime: Runtime, req) -> CompressionConfig:
    """The server config with the request's per-request override applied (validated by
    ``patches/tokenizer_manager.py`` before the request reached the scheduler; a request
    that reaches it otherwise and fails the same check is not compressed)."""
    custom = getattr(req.sampling_params, "custom_params", None) or {}
    override = custom.get("kv_compression") if isinstance(custom, dict) else None
    if not override:
        return runtime.config
    try:
        config = runtime.config.with_overrides(override, runtime.context_len)
        problem = policy_problem(config.policy, runtime.tp_size)
        if problem:
            raise ConfigError(f"{OVERRIDE_KEY}.policy: {problem}")
        return config
    except ConfigError as exc:
        logger.warning("bacon-sglang: %s: invalid override, not compressed: %s", req.rid, exc)
        return dataclasses.replace(runtime.config, policy="none")


def unsupported(scheduler, kv_pool) -> list[str]:
    """What compression cannot handle yet in this scheduler (empty when all is fine)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from bacon_sglang.patches.cuda_graph import refused_execution_paths

    problems = []
    spec = getattr(scheduler, "spec_algorithm", None)
    if spec is not None and not spec.is_none():
        problems.append("speculative decoding")
    server_args = scheduler.server_args
    if getattr(server_args, "enable_mixed_chunk", False):
        problems.append("--enable-mixed-chunk")
    problems += scale_out_problems(server_args)
    for name in ("enable_hierarchical_cache", "enable_lmcache", "enable_hisparse"):
        if getattr(server_args, name, False):
            problems.append(f"--{name.replace('_', '-')}")
    if (getattr(server_args, "kv_canary", "none") or "none") != "none":
        problems.append("--kv-canary")
    tree_cache = scheduler.tree_cache
    if tree_cache.supports_swa() or tree_cache.supports_mamba():
        problems.append("hybrid sliding-window / mamba models")
    if type(kv_pool) is not MHATokenToKVPool:
        problems.append(f"KV pool {type(kv_pool).__name__} (only MHATokenToKVPool)")
    problems += refused_execution_paths(scheduler)  # graphs, attention backend
    config = config_of(server_args)
    if config.layout == "cells":
        problems += cells.problems(scheduler, kv_pool)
    problem = policy_problem(config.policy, getattr(server_args, "tp_size", 1) or 1)
    if problem:
        problems.append(problem)
    return problems


def after_scheduler_init(result, scheduler, server_args, *args, **kwargs):
    """AFTER ``Scheduler.__init__(self, server_args, port_args, ...)``."""
    global RUNTIME
    from bacon_sglang.patches import unapplied_targets

    config = config_of(server_args)
    scheduler.bacon_kv_config = config
    logger.info("bacon-sglang: scheduler KV compression config: %s", config.to_dict())
    if not config.enabled:
        RUNTIME = None
        return result
    missing = unapplied_targets()
    if missing:
        raise RuntimeError(f"bacon-sglang: hooks not applied to {missing}; see the log above")
    kv_pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
    problems = unsupported(scheduler, kv_pool)
    if problems:
        layout = " --kv-layout cells" if config.layout == "cells" else ""
        raise RuntimeError(
            f"--kv-policy {config.policy}{layout} cannot be used with: {', '.join(problems)}. "
            "Remove those options or use --kv-policy none."
        )
    tp = tensor_parallel(scheduler, kv_pool, config)
    RUNTIME = Runtime(
        config=config,
        req_to_token_pool=scheduler.req_to_token_pool,
        kv_pool=kv_pool,
        tree_cache=scheduler.tree_cache,
        page_size=scheduler.token_to_kv_pool_allocator.page_size,
        num_layers=kv_pool.layer_num,
        num_kv_heads=kv_pool.head_num,
        counters=make_counters() if getattr(server_args, "enable_metrics", False) else None,
        context_len=scheduler.model_config.context_len,
        head_scores=head_scores(
            config, kv_pool.layer_num, scheduler.model_config.get_total_num_kv_heads()
        ),
        **tp,
    )
    return result


def tensor_parallel(scheduler, kv_pool, config: CompressionConfig) -> dict:
    """``tp_size``, ``tp_rank`` and, with ``--kv-layout cells``, ``tp_heads`` of the
    :class:`Runtime`. Every rank plans the cells of every rank from the model's heads each
    holds, so their split must be the one :func:`bacon_sglang.cells.rank_heads` predicts."""
    from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_rank

    size = int(getattr(scheduler.server_args, "tp_size", 1) or 1)
    if size <= 1:
        return {"tp_size": 1}
    rank = get_tensor_model_parallel_rank()
    if config.layout != "cells":
        return {"tp_size": size, "tp_rank": rank}
    total = scheduler.model_config.get_total_num_kv_heads()
    heads = tuple(rank_heads(r, size, total) for r in range(size))
    if len(heads[rank]) != kv_pool.head_num:
        raise RuntimeError(
            f"--kv-layout cells: TP rank {rank} holds {kv_pool.head_num} KV heads, expected "
            f"{len(heads[rank])} of {total} over {size} ranks"
        )
    return {"tp_size": size, "tp_rank": rank, "tp_heads": heads}


def head_scores(
    config: CompressionConfig, num_layers: int, num_kv_heads: int | None = None
) -> tuple[tuple[float, ...], ...]:
    """``--kv-head-scores``: SparseMM's ``[L][Hkv of the model]`` scores, read once (empty
    without the flag); a file that is missing or does not fit the model (``num_layers``,
    ``num_kv_heads``: all its KV heads, also under tensor parallelism) stops the launch."""
    if not config.head_scores:
        return ()
    try:
        scores = visual_heads.read(config.head_scores)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"--kv-head-scores {config.head_scores}: unreadable: {exc!r}") from None
    if len(scores) != num_layers:
        raise RuntimeError(
            f"--kv-head-scores {config.head_scores}: {len(scores)} layers of scores for a "
            f"model of {num_layers}"
        )
    if num_kv_heads is not None and any(len(row) != num_kv_heads for row in scores):
        raise RuntimeError(
            f"--kv-head-scores {config.head_scores}: rows of {sorted({len(r) for r in scores})} "
            f"heads for a model of {num_kv_heads} KV heads"
        )
    return scores


def build_plan(runtime: Runtime, batch) -> list[PlanEntry]:
    """Entries for the requests of an extend batch that are or will be compressed.

    Marks each of them ``skip_radix_cache_insert`` (its KV will not match its token ids
    once compressed, so SGLang must never insert it; with a copy, the plan's own insert
    publishes the prompt's full KV instead). A request whose planning raises is served
    uncompressed (:func:`record_failure`); stashed window queries of requests that are not
    in this batch any more (aborted, retracted) are dropped."""
    entries = []
    q_start = 0
    extend_lens = batch.extend_lens or []
    in_batch = set()
    for i, req in enumerate(batch.reqs):
        q_len = int(extend_lens[i]) if i < len(extend_lens) else 0
        start, q_start = q_start, q_start + q_len
        in_batch.add(id(req))
        try:
            entry = plan_entry(runtime, batch, i, req, start, q_len)
        except Exception as exc:  # noqa: BLE001 - any planning error: serve uncompressed
            record_failure(runtime, req, "plan", exc)
            entry = None
        if entry is not None:
            entries.append(entry)
    for req in [r for r in runtime.windows if id(r) not in in_batch]:
        del runtime.windows[req]
    return entries


def plan_entry(runtime: Runtime, batch, i: int, req, q_start: int, q_len: int):
    """The :class:`PlanEntry` of request ``i`` of an extend batch, or None when it is not
    compressed (a short prompt, policy none, no tokens to decode, an earlier failure)."""
    config = request_config(runtime, req)
    full_len = len(req.full_untruncated_fill_ids)
    copy = copies_prompt(runtime, config)
    retained = getattr(req, "bacon_keep", None)
    prompt_len = full_len if retained is None else retained.prompt_len
    private = prompt_len - kept_whole(runtime, req, config, copy)
    if (
        q_len == 0
        or getattr(req, "bacon_failed", False)
        or req.sampling_params.max_new_tokens == 0  # prefill only (parallel-sampling warm-up)
        or not config.should_compress(private)
    ):
        runtime.windows.pop(req, None)
        return None
    end = int(batch.seq_lens_cpu[i])
    finishing = end == full_len  # the prompt ends in this forward
    if retained is not None:  # prefilled again after a retraction: the same keep-set
        return replay_entry(runtime, req, config, copy, q_start, q_len, end, finishing)
    req.skip_radix_cache_insert = True
    window = runtime.windows.setdefault(req, WindowQueries(config.window))
    compression = None
    if finishing:
        runtime.windows.pop(req, None)
        compression = plan_compression(runtime, req, config, full_len, copy)
        if compression is None:  # not compressed after all (cells: no room for the cell slots)
            return None
    return PlanEntry(req, q_start, q_len, window, compression)


def replay_entry(
    runtime: Runtime, req, config: CompressionConfig, copy: bool,
    q_start: int, q_len: int, end: int, finishing: bool,
) -> PlanEntry | None:  # fmt: skip
    """The entry of a retracted request prefilled again (prompt + the tokens it had
    generated, up to ``end`` in this forward): the generated tokens' rows attend to the kept
    KV only, as their decode did (``bacon_sglang/retraction.py``), and the forward that ends
    it compacts the prompt to its first keep-set, the generated tokens kept whole. None
    (served uncompressed, counted as a failure) when its shared prefix changed meanwhile, so
    the old keep-set no longer applies."""
    retained: RetainedKeep = req.bacon_keep
    req.skip_radix_cache_insert = True
    prefix_len = kept_whole(runtime, req, config, copy)
    if prefix_len != retained.prefix_len:
        record_failure(
            runtime, req, "retraction", f"shared prefix {retained.prefix_len} -> {prefix_len}"
        )
        return None
    compression = None
    if finishing:
        compression = reuse_compression(runtime, req, config, end, copy)
        if compression is None:
            return None
    row = runtime.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :end]
    recomputed = recomputed_rows(
        retained.keep, prefix_len, retained.prompt_len, row, end - q_len, end, q_start
    )
    if compression is None and recomputed is None:
        return None
    # Its generated tokens' KV are the decode's, not the full prompt's: never in the tree,
    # even if compression fails later on (record_failure).
    req.bacon_replayed = recomputed is not None or getattr(req, "bacon_replayed", False)
    return PlanEntry(req, q_start, q_len, None, compression, end - retained.prompt_len, recomputed)


def reuse_compression(
    runtime: Runtime, req, config: CompressionConfig, full_len: int, copy: bool
) -> RequestCompression | None:
    """The compression of a retracted request's last forward: the prompt keeps what its
    first prefill chose (``req.bacon_keep``), the generated tokens are kept whole (with
    cells: ``G`` more cells in every (layer, head), after its prompt's; a ragged keep-set's
    padding stays where it was, ``CellKeep.from_padded`` skips it)."""
    retained: RetainedKeep = req.bacon_keep
    prefix_len = retained.prefix_len
    slots = runtime.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :full_len].clone()
    num_layers, num_kv_heads, _ = retained.keep.shape
    generated = torch.arange(retained.prompt_len, full_len, device=retained.keep.device)
    keep = torch.cat([retained.keep, generated.expand(num_layers, num_kv_heads, -1)], dim=-1).to(
        slots.device
    )
    c = RequestCompression(
        config, runtime.policy(config), full_len, prefix_len, keep.shape[-1], slots, keep,
        cached_len=req.kv.cache_protected_len,
    )  # fmt: skip
    if config.layout == "cells":  # the generated tokens become cells of every (layer, head)
        store_again_in_cells(c, retained, full_len - retained.prompt_len)
    if copy or c.cells:
        c.copy_slots = radix_cache.alloc_copy(runtime.tree_cache, c.new_len - prefix_len)
        if c.copy_slots is None:
            record_failure(runtime, req, "retraction", "no room for the compressed copy")
            return None
    runtime.retraction_reuses += 1
    return c


def record_failure(runtime: Runtime, req, stage: str, error) -> None:
    """Compression of ``req`` failed at ``stage`` before its KV was changed: it is served
    uncompressed from here on (and cached as SGLang would, unless the prefill after a
    retraction already recomputed its generated tokens over the kept KV), the failure counted in
    ``/server_info`` and Prometheus, one log line with the rid."""
    serve_uncompressed(runtime, req)
    runtime.failures += 1
    if runtime.counters is not None:
        runtime.counters.failures.inc()
    logger.error(
        "bacon-sglang: compression of %s failed (%s), served uncompressed: %s",
        req.rid, stage, error if isinstance(error, str) else repr(error),
    )  # fmt: skip


def serve_uncompressed(runtime: Runtime, req) -> None:
    """``req`` is not compressed from here on (nor after a retraction): cached as SGLang
    would, unless the prefill after a retraction already recomputed its generated tokens
    over the kept KV; its stashed window queries are dropped."""
    req.bacon_failed = True
    req.skip_radix_cache_insert = getattr(req, "bacon_replayed", False)
    runtime.windows.pop(req, None)


def fail_plan(runtime: Runtime, entries: list[PlanEntry], stage: str, error) -> None:
    """The forward's compression failed before any KV was moved: every planned request is
    served uncompressed and its copy slots (never pointed at) go back to the pool; rows of
    the cell tables the compaction may have written are cleared."""
    rows = [e.req.kv.req_pool_idx for e in entries if e.compression and e.compression.cells]
    if rows:
        cells.CELLS.clear(to_device(rows, cells.CELLS.tables.meta.device))
    for entry in entries:
        c = entry.compression
        if c is not None and c.copy_slots is not None:
            radix_cache.free_copy(runtime.tree_cache, c.copy_slots)
        entry.compression = None
        entry.window = None
        record_failure(runtime, entry.req, stage, error)


def contain_forward_failure(runtime: Runtime, error: Exception, compacting: bool) -> None:
    """An exception in the forward's compression path (``patches/attention.py``): scoring
    failed (``compacting=False``): nothing was moved, every planned request is served
    uncompressed. Compaction failed: requests compacted into a copy are served uncompressed
    (their rows were never touched); a request compacted in place may have half-moved KV,
    so it alone is aborted (HTTP 500). A device error (CUDA's sticky errors) leaves no
    state to trust: it is raised, and SGLang stops the server."""
    if _is_device_error(error):
        raise error
    entries = runtime.plan or []
    if not compacting:
        fail_plan(runtime, entries, "score", error)
        return
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    copied = [
        e for e in entries if e.compression is not None and e.compression.copy_slots is not None
    ]
    in_place = [
        e for e in entries if e.compression is not None and e.compression.copy_slots is None
    ]
    fail_plan(runtime, copied, "compact", error)
    for entry in in_place:
        entry.compression = None
        record_failure(runtime, entry.req, "compact in place: request aborted", error)
        entry.req.skip_radix_cache_insert = True  # its KV must never reach the tree
        entry.req.to_finish = FINISH_ABORT(
            "bacon-sglang: KV compaction failed for this request", status_code=500
        )


def _is_device_error(error: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return "CUDA error" in str(error) or "device-side assert" in str(error)


def copies_prompt(runtime: Runtime, config: CompressionConfig) -> bool:
    """Whether compression leaves the full prompt in the radix tree and decodes from a
    copy (``--kv-prefix-cache full`` with the radix cache on)."""
    return config.prefix_cache == "full" and runtime.tree_cache.supports_prefix_sharing()


def kept_whole(runtime: Runtime, req, config: CompressionConfig, copy: bool) -> int:
    """Prompt tokens kept whole, never compressed: the text before the first image with
    ``--kv-text-prefix share``; compacting in place, also what the request matched in the
    radix tree (a copy compresses the matched part too, reading it from the tree)."""
    text = 0
    if config.text_prefix == "share" and runtime.tree_cache.supports_prefix_sharing():
        text = text_before_first_image(req, runtime.page_size)
    return text if copy else max(req.kv.cache_protected_len, text)


def plan_compression(
    runtime: Runtime, req, config: CompressionConfig, full_len: int, copy: bool
) -> RequestCompression | None:
    """The compression of a request whose prompt ends in this forward: into a fresh copy
    when asked and the pool has room (evicting LRU cache if needed), else in place."""
    slots = runtime.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :full_len].clone()

    def plan(copy: bool) -> RequestCompression | None:
        return plan_request(
            config,
            runtime.policy(config),
            full_len,
            kept_whole(runtime, req, config, copy),
            slots,
            runtime.num_layers,
            runtime.num_kv_heads,
            cached_len=req.kv.cache_protected_len,
        )

    c = plan(copy)
    if c is not None and config.layout == "cells":
        return plan_cells(runtime, req, c)
    if c is None or not copy:
        return c
    c.copy_slots = radix_cache.alloc_copy(runtime.tree_cache, c.kept)
    if c.copy_slots is not None:
        return c
    runtime.copy_fallbacks += 1
    logger.info("bacon-sglang: no room for a compressed copy of %s: in place", req.rid)
    c = plan(False)
    if c is not None:
        c.copy_fallback = True
    return c


def plan_cells(runtime: Runtime, req, c: RequestCompression) -> RequestCompression | None:
    """``c`` stored head-granular (``--kv-layout cells``): its ``m`` cell slots allocated
    fresh, in either prefix-cache mode (evicting LRU cache if needed). None when even that
    leaves no room: the request is served uncompressed (counted in ``cell_fallbacks``; the
    two-launch in-place variant of ``patches/head_granular.md`` 4.7 is not built)."""
    store_in_cells(runtime, c)
    c.copy_slots = radix_cache.alloc_copy(runtime.tree_cache, c.cell_slots)
    if c.copy_slots is not None:
        return c
    serve_uncompressed(runtime, req)
    runtime.cell_fallbacks += 1
    logger.info("bacon-sglang: no room for the cell slots of %s: served uncompressed", req.rid)
    return None


def store_in_cells(runtime: Runtime, c: RequestCompression) -> None:
    """``c`` stored head-granular: its cells ``C`` counted on the host from the allocation
    (``cells.kept_cells``; uniform policies: ``L * Hkv * kept``). With tensor parallelism
    every rank counts every rank's ``C_r`` (the heads each holds, SparseMM's scores of all
    of them), so that all allocate the same ``m``, the largest rank's (``cell_slots``)."""
    if c.config.policy not in RAGGED_POLICIES:
        per_rank = [runtime.num_layers * len(heads) * c.kept for heads in runtime.tp_heads]
        c.store_in_cells(None, per_rank)
        return
    per_rank = [
        kept_cells(
            c.policy, c.prompt_len, c.prefix_len, c.kept, c.config.window, runtime.num_layers,
            heads,
        )
        for heads in runtime.tp_heads or (range(runtime.num_kv_heads),)
    ]  # fmt: skip
    c.store_in_cells(per_rank[runtime.tp_rank], per_rank if runtime.tp_heads else ())


def store_again_in_cells(c: RequestCompression, retained: RetainedKeep, generated: int) -> None:
    """``c`` of a request prefilled again after a retraction, stored head-granular: the cells
    its first prefill counted (every rank's ``C_r`` with tensor parallelism), then its
    ``generated`` tokens in every (layer, KV head) of each rank."""
    num_layers, num_kv_heads, _ = c.keep.shape  # the rank's heads (every rank holds as many)
    more = num_layers * num_kv_heads * generated
    c.store_in_cells(retained.cells + more, [r + more for r in retained.rank_cells])


def capped_prefix_match(result: int, req, input_len: int) -> int:
    """AFTER ``Req._compute_max_prefix_len(self, input_len)``: a request that will be
    compressed into a copy matches at most ``input_len - window`` tokens in the radix tree,
    so that the queries of its whole observation window are computed in its prefill (a
    second question about a cached image would otherwise prefill fewer than ``w`` tokens).
    A request prefilled again after a retraction matches at most its prompt: the KV of its
    generated tokens must be its decode's (``bacon_sglang/retraction.py``), never the tree's."""
    runtime = RUNTIME
    if runtime is None:
        return result
    retained = getattr(req, "bacon_keep", None)
    if retained is not None and not getattr(req, "bacon_failed", False):
        return min(result, retained.prompt_len)
    config = request_config(runtime, req)
    if not copies_prompt(runtime, config):
        return result
    if not config.should_compress(input_len - kept_whole(runtime, req, config, True)):
        return result
    return max(0, min(result, input_len - config.window))


def text_before_first_image(req, page_size: int) -> int:
    """Tokens before the request's first image, rounded down to whole pages (0 without an
    image): with ``--kv-text-prefix share`` they are kept whole and go into the radix tree."""
    mm = getattr(req, "multimodal_inputs", None)
    starts = [start for item in (mm.mm_items if mm else []) for start, _ in item.offsets or []]
    return min(starts) // page_size * page_size if starts else 0


def dump_keep_sets(c: RequestCompression, rid: str, retracted: bool = False) -> None:
    """``--kv-debug-dir``: save the request's keep-sets (tests compare against them);
    ``<rid>.pt``, or ``<rid>.tp<rank>.pt`` per tensor-parallel rank; the prefill after a
    retraction writes ``<rid>.retracted.pt`` (its keep-sets end with the generated tokens)."""
    from sglang.srt.distributed.parallel_state import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    directory = Path(c.config.debug_dir)
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "rid": rid,
        "keep": c.keep.cpu(),
        "prefix_len": c.prefix_len,
        "prompt_len": c.prompt_len,
        "kept": c.kept,
        "cells": c.cells,  # this rank's C (0: slots layout)
        "cell_slots": c.cell_slots if c.cells else 0,
    }
    # With --tp-size N each rank holds (and writes the keep-sets of) its own KV heads.
    tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    path = keep_set_path(directory, rid, tp_rank if tp_size > 1 else None, retracted)
    torch.save({**record, "tp_rank": tp_rank, "tp_size": tp_size}, path)


_SAFE_RID = re.compile(r"[A-Za-z0-9_-]{1,100}")


def keep_set_path(
    directory: Path, rid: str, tp_rank: int | None = None, retracted: bool = False
) -> Path:
    """``DIR/<rid>.pt`` (``<rid>.tp<rank>.pt`` per tensor-parallel rank) for a rid of at
    most 100 letters, digits, ``_`` and ``-`` (SGLang's own rids); any other rid is
    written as those characters (others replaced by ``_``, cut to 64) and a hash of the
    rid, so every file stays inside ``DIR`` and two rids never share a file."""
    rid = str(rid)
    if _SAFE_RID.fullmatch(rid):
        stem = rid
    else:
        digest = hashlib.sha256(rid.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        stem = f"{re.sub(r'[^A-Za-z0-9_-]', '_', rid)[:64]}-{digest}"
    suffix = (".retracted" if retracted else "") + ("" if tp_rank is None else f".tp{tp_rank}")
    return Path(directory) / f"{stem}{suffix}.pt"


def apply_plan(runtime: Runtime, batch, entries: list[PlanEntry]) -> None:
    """After the forward: free each compressed request's evicted slots and shorten its KV
    length everywhere SGLang keeps it (``Req.kv``, the batch's ``seq_lens``)."""
    ps = runtime.page_size
    new_lens = {}
    for entry in entries:
        c = entry.compression
        if c is None:
            continue
        req = entry.req
        if c.copy_slots is not None:  # a compressed copy, or cells
            tree_tokens = place_copy(runtime, req, c, entry.generated)
        else:  # in place: the evicted tail of the row goes back, whole pages
            tree_tokens = release_prompt(runtime, req, c, -(-c.new_len // ps) * ps)
        req.kv.kv_allocated_len = c.new_len
        req.kv.kv_committed_len = c.new_len
        req.bacon_position_offset = c.evicted
        if entry.generated == 0:  # a retracted request is compacted to the same tokens
            req.bacon_keep = RetainedKeep(c.prompt_len, c.prefix_len, c.keep, c.cells, c.rank_cells)
        # After a retraction the report is the prompt's, as at its first prefill: the
        # tokens generated before it are no prompt, kept whole, never counted as kept.
        generated_cells = entry.generated * runtime.num_layers * runtime.num_kv_heads
        prompt_only = dataclasses.replace(
            c, prompt_len=c.prompt_len - entry.generated, kept=c.kept - entry.generated,
            cells=c.cells - generated_cells if c.cells else 0,
            rank_cells=tuple(n - generated_cells for n in c.rank_cells),
        )  # fmt: skip
        stats = prompt_only.stats(ps, tree_tokens)
        if req.customized_info is None:
            req.customized_info = {}
        req.customized_info["kv_compression"] = [stats]
        runtime.compressed_requests += 1
        runtime.evicted_tokens += c.evicted
        runtime.freed_slots += stats["freed_slots"]
        if runtime.counters is not None:
            runtime.counters.record(c.evicted, stats["freed_slots"], c.copy_fallback)
        new_lens[id(req)] = c.new_len
        if c.config.debug_dir:
            try:
                dump_keep_sets(c, req.rid, retracted=entry.generated > 0)
            except OSError as exc:  # a debugging aid: never the reason a request fails
                logger.error("bacon-sglang: keep-sets of %s not written: %r", req.rid, exc)
        logger.info(
            "bacon-sglang: compressed %s: policy=%s prompt=%d cached=%d shared_prefix=%d "
            "kept=%d evicted=%d freed_slots=%d kv=%s tree_tokens=%d generated=%d",
            req.rid, c.config.policy, stats["prompt_tokens"], c.cached_len, c.prefix_len,
            stats["kept_tokens"], c.evicted, stats["freed_slots"], stats["kv_source"],
            tree_tokens, entry.generated,
        )  # fmt: skip
    if not new_lens:
        return
    current = batch.seq_lens_cpu.tolist()
    lens = [new_lens.get(id(r), int(n)) for r, n in zip(batch.reqs, current, strict=True)]
    delta = torch.tensor(lens, dtype=batch.seq_lens_cpu.dtype) - batch.seq_lens_cpu
    # New tensors, never in place: the in-flight forward may still read the old ones.
    batch.seq_lens_cpu = batch.seq_lens_cpu + delta
    batch.seq_lens = batch.seq_lens + delta.to(batch.seq_lens.device, batch.seq_lens.dtype)
    if getattr(batch, "orig_seq_lens", None) is not None:
        batch.orig_seq_lens = batch.orig_seq_lens + delta.to(
            batch.orig_seq_lens.device, batch.orig_seq_lens.dtype
        )
    batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())


def place_copy(runtime: Runtime, req, c: RequestCompression, generated: int) -> int:
    """After a compaction into fresh slots (a compressed copy, or cells): the prompt goes to
    the radix tree (``--kv-prefix-cache full``; not the ``generated`` tokens of a prefill
    after a retraction) or its private slots ``[S, L)`` back to the allocator (``shared``,
    cells only), then the row's ``[S, S + kept)`` (cells: ``[S, S + m)``) points at the fresh
    slots. Returns the prompt tokens the tree holds for the request."""
    if copies_prompt(runtime, c.config):
        tree_tokens = radix_cache.publish_prompt(
            runtime.tree_cache, req, c.prompt_len - generated, c.prefix_len, c.prompt_len
        )
        runtime.copies += 1
    else:
        tree_tokens = release_prompt(runtime, req, c, c.prefix_len)
    radix_cache.point_row_at(
        runtime.req_to_token_pool, req, c.prefix_len, c.copy_slots[: c.new_len - c.prefix_len]
    )
    if c.cells:
        runtime.cell_requests[req] = (c.all_cells, c.cell_slots)
    return tree_tokens


def release_prompt(runtime: Runtime, req, c: RequestCompression, start: int) -> int:
    """The row's prompt slots ``[start, L)`` back to the allocator and, with
    ``--kv-text-prefix share``, the shared text ``[0, S)`` into the radix tree. Returns the
    prompt tokens the tree holds for the request (``S``)."""
    if start < c.prompt_len:
        runtime.tree_cache.free_kv_row(req.kv, [(start, c.prompt_len)])
    if c.prefix_len > req.kv.cache_protected_len:  # --kv-text-prefix share
        runtime.tree_cache.checkpoint(req, up_to=c.prefix_len)
    return c.prefix_len


def around_run_batch(original, scheduler, batch, *args, **kwargs):
    """AROUND ``Scheduler.run_batch(self, batch, ...)``."""
    runtime = RUNTIME
    if runtime is None or batch.forward_mode.name != "EXTEND":
        return original(scheduler, batch, *args, **kwargs)
    entries = build_plan(runtime, batch)
    if not entries:
        result = original(scheduler, batch, *args, **kwargs)
        parallel.assert_tp_ranks_agree(scheduler, [])
        return result
    runtime.plan = entries
    try:
        result = original(scheduler, batch, *args, **kwargs)
    except BaseException:
        for entry in entries:  # the forward failed: copies were never filled nor pointed at
            if entry.compression is not None and entry.compression.copy_slots is not None:
                radix_cache.free_copy(runtime.tree_cache, entry.compression.copy_slots)
        raise
    finally:
        runtime.plan = runtime.forward = None
    apply_plan(runtime, batch, entries)
    parallel.assert_tp_ranks_agree(scheduler, [e.req for e in entries if e.compression])
    return result


def kv_memory(scheduler) -> dict:
    """The KV pool's accounting and the compression counters of this scheduler.

    When no request is running, ``available + evictable == total`` (every slot is either
    free or owned by the radix tree): the integrity check the tests call."""
    runtime = RUNTIME
    return {
        "total": scheduler.max_total_num_tokens,
        "available": scheduler.token_to_kv_pool_allocator.available_size(),
        "evictable": scheduler.tree_cache.evictable_size(),
        "protected": scheduler.tree_cache.protected_size(),
        "compressed_requests": runtime.compressed_requests if runtime else 0,
        "evicted_tokens": runtime.evicted_tokens if runtime else 0,
        "freed_slots": runtime.freed_slots if runtime else 0,
        "copies": runtime.copies if runtime else 0,
        "copy_fallbacks": runtime.copy_fallbacks if runtime else 0,
        "failures": runtime.failures if runtime else 0,
        "retraction_reuses": runtime.retraction_reuses if runtime else 0,
        "cell_fallbacks": runtime.cell_fallbacks if runtime else 0,
        **cells_held(runtime),
        "stashed_requests": stashed_requests(runtime, scheduler),
        **parallel.STATS,
    }


def stashed_requests(runtime: Runtime | None, scheduler) -> int:
    """Requests holding stashed window queries: only one whose chunked prefill is under way
    (SGLang's ``chunked_req``) may; any other entry (aborted between chunks, say) is dropped
    here. 0 at idle."""
    if runtime is None:
        return 0
    current = getattr(scheduler, "chunked_req", None)
    for req in [r for r in runtime.windows if r is not current]:
        del runtime.windows[req]
    return len(runtime.windows)


def cells_held(runtime: Runtime | None) -> dict[str, int]:
    """``cells_held`` and ``cell_slots_held``: the cells (C) and cell slots (m) of the
    requests whose rows hold cells now (``--kv-layout cells``); 0 at idle. A request that
    gave its row back (finished, aborted, retracted) is dropped here. With tensor
    parallelism, as the per-request report: the cells of every rank, the slots of each."""
    if runtime is None:
        return {"cells_held": 0, "cell_slots_held": 0}
    for req in [r for r in runtime.cell_requests if not r.kv.holds_kv]:
        del runtime.cell_requests[req]
    held = list(runtime.cell_requests.values())
    return {"cells_held": sum(c for c, _ in held), "cell_slots_held": sum(m for _, m in held)}


def after_get_internal_state(result, scheduler, *args, **kwargs):
    """AFTER ``Scheduler.get_internal_state``: adds ``bacon_kv`` (see :func:`kv_memory`) to
    each scheduler's entry of ``GET /server_info``'s ``internal_states``."""
    memory = kv_memory(scheduler)
    ranks = parallel.all_ranks(scheduler, memory)
    result.internal_state["bacon_kv"] = memory if ranks is None else {**memory, "tp_ranks": ranks}
    return result


HOOKS = [
    ("sglang.srt.managers.scheduler.Scheduler.__init__", after_scheduler_init, "AFTER"),
    ("sglang.srt.managers.scheduler.Scheduler.run_batch", around_run_batch, "AROUND"),
    (
        "sglang.srt.managers.scheduler.Scheduler.get_internal_state",
        after_get_internal_state,
        "AFTER",
    ),
]
