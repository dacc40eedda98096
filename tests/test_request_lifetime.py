"""Scheduler-side request lifetime helpers, without an engine: keep-set file names from
client rids, the retraction order, the stash of window queries keyed by request object."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def scheduler_patch(sglang_hooks):
    from bacon_sglang.patches import scheduler

    return scheduler


@pytest.mark.parametrize(
    "rid", ["../x", "a/b", "..", ".", "", "/etc/passwd", "x" * 300, "é/ü", "nul\x00byte"]
)
def test_keep_set_files_stay_in_their_folder(scheduler_patch, tmp_path, rid):
    path = scheduler_patch.keep_set_path(tmp_path, rid)
    assert path.parent == tmp_path
    assert len(path.name) < 120 and path.name.endswith(".pt")
    assert path.name not in {".pt", "..pt"}


def test_safe_rids_keep_their_name_and_others_never_collide(scheduler_patch, tmp_path):
    path = scheduler_patch.keep_set_path
    assert path(tmp_path, "0f3a-b_9").name == "0f3a-b_9.pt"
    assert path(tmp_path, "r", tp_rank=1).name == "r.tp1.pt"
    assert path(tmp_path, "r", retracted=True).name == "r.retracted.pt"
    assert path(tmp_path, "a/b") != path(tmp_path, "a_b") != path(tmp_path, "a?b")


def test_compressed_requests_are_retracted_last(sglang_hooks):
    from bacon_sglang.patches.schedule_batch import retraction_order

    reqs = [SimpleNamespace(bacon_position_offset=o) for o in (0, 200, 0, 150)]
    # SGLang's order, most preferred to keep first; it retracts from the end.
    assert retraction_order([3, 2, 1, 0], reqs) == [3, 1, 2, 0]
    assert retraction_order([0, 2], reqs) == [0, 2]


class Req:
    """Stands for SGLang's ``Req``: hashable by identity, weakly referenceable."""

    def __init__(self, rid: str):
        self.rid = rid


def test_the_stash_is_keyed_by_request_object_not_rid(scheduler_patch):
    from bacon_sglang.compression import WindowQueries

    runtime = SimpleNamespace(
        windows=scheduler_patch.Runtime.__dataclass_fields__["windows"].default_factory()
    )
    aborted, reused = Req("same"), Req("same")
    runtime.windows[aborted] = WindowQueries(64)
    assert reused not in runtime.windows
    scheduler = SimpleNamespace(chunked_req=None)
    assert scheduler_patch.stashed_requests(runtime, scheduler) == 0  # not the chunked one
    runtime.windows[reused] = WindowQueries(32)
    assert scheduler_patch.stashed_requests(runtime, SimpleNamespace(chunked_req=reused)) == 1
    del reused
    gc.collect()
    assert len(runtime.windows) == 0  # gone with its request


def test_cells_held_counts_only_requests_holding_their_row(scheduler_patch, monkeypatch):
    """``bacon_kv.cells_held`` / ``cell_slots_held`` (``--kv-layout cells``): a request
    counts while it holds its row; one that gave it back (finished, aborted) is dropped, and
    a retracted one is dropped at once (it may be prefilled again without cells)."""
    from bacon_sglang.patches.schedule_batch import after_reset_for_retract

    fields = scheduler_patch.Runtime.__dataclass_fields__
    runtime = SimpleNamespace(
        windows=fields["windows"].default_factory(),
        cell_requests=fields["cell_requests"].default_factory(),
    )
    decoding, finished, retracted = Req("a"), Req("b"), Req("c")
    for req, row in ((decoding, 3), (finished, None), (retracted, 5)):
        req.kv = SimpleNamespace(req_pool_idx=row, holds_kv=row is not None)
        runtime.cell_requests[req] = (512, 64)
    monkeypatch.setattr(scheduler_patch, "RUNTIME", runtime)
    after_reset_for_retract(None, retracted)
    assert retracted.bacon_position_offset == 0
    assert scheduler_patch.cells_held(runtime) == {"cells_held": 512, "cell_slots_held": 64}
    assert list(runtime.cell_requests) == [decoding]
    assert scheduler_patch.cells_held(None) == {"cells_held": 0, "cell_slots_held": 0}
