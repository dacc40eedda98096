"""CPU development and test shim: runs SGLang's real engine on a machine without a GPU.

SGLang 0.5.23 imports the CUDA-built ``sgl_kernel`` package in a few CPU code paths
(``from sgl_kernel import assign_req_to_token_pool_cpu`` in ``srt/mem_cache/allocation.py``)
and looks ops up in the ``torch.ops.sgl_kernel`` namespace. The package index has no CPU
build of ``sgl_kernel``, and the CUDA build cannot load without a CUDA driver. This shim
replaces it with :mod:`bacon_sglang.cpu_shim.sgl_kernel_stub`, a few pure-PyTorch ops,
**only when no CUDA device is present**; on a GPU machine it does nothing.

Tensor parallelism on CPU: SGLang builds a PyNccl communicator (and asks for custom
all-reduce) for every model-parallel group on in-tree platforms, CPU included, and PyNccl
raises ``Expected a cuda device, but got: cpu``. The shim therefore also wraps
``sglang.srt.distributed.parallel_state.init_model_parallel_group`` as that module is
imported, turning the CUDA-only communicators off; the groups then all-reduce over gloo
(``torch.distributed``), SGLang's own CPU fallback when its shared-memory op is missing.

It is not used in production. It is activated by putting this folder on ``PYTHONPATH`` (its
``sitecustomize`` module then runs at interpreter start-up, in the launcher and in every
spawned SGLang subprocess). :func:`cpu_engine_env` builds that environment.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

SHIM_DIR = Path(__file__).resolve().parent
STUB_MODULE = "bacon_sglang.cpu_shim.sgl_kernel_stub"


def cuda_device_present() -> bool:
    """True when an NVIDIA driver or device node is visible (checked without importing torch)."""
    return os.path.exists("/proc/driver/nvidia/version") or any(
        os.path.exists(f"/dev/nvidia{i}") for i in range(8)
    )


class _StubFinder(importlib.abc.MetaPathFinder):
    """Resolves ``import sgl_kernel`` (and its submodules) to the pure-PyTorch stub."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "sgl_kernel" and not fullname.startswith("sgl_kernel."):
            return None
        if fullname != "sgl_kernel":
            return None  # submodules: ImportError, so SGLang takes its fallbacks
        return importlib.util.spec_from_loader(fullname, _StubLoader())


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return importlib.import_module(STUB_MODULE)

    def exec_module(self, module):
        module.install_torch_ops()


PARALLEL_STATE = "sglang.srt.distributed.parallel_state"
# CUDA-only communicators of SGLang's model-parallel groups, off on the CPU engine.
CUDA_COMMUNICATORS_OFF = {
    "use_pynccl": False,
    "use_custom_allreduce": False,
    "use_mscclpp": False,
    "use_torch_symm_mem_allreduce": False,
}


def without_cuda_communicators(init_model_parallel_group):
    """Wrap SGLang's ``init_model_parallel_group(group_ranks, local_rank, backend, **kw)`` so
    that every group it builds uses ``torch.distributed`` (gloo) only."""

    @functools.wraps(init_model_parallel_group)
    def wrapper(*args, **kwargs):
        return init_model_parallel_group(*args, **{**kwargs, **CUDA_COMMUNICATORS_OFF})

    wrapper.bacon_cpu_shim = True
    return wrapper


class _ParallelStateFinder(importlib.abc.MetaPathFinder):
    """Finds ``sglang.srt.distributed.parallel_state`` with the other finders and patches it
    right after it executes (before any other module can import names from it)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != PARALLEL_STATE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        module.init_model_parallel_group = without_cuda_communicators(
            module.init_model_parallel_group
        )


def install() -> bool:
    """Route ``import sgl_kernel`` to the stub and turn SGLang's CUDA-only model-parallel
    communicators off, when no CUDA device is present.

    Returns whether the shim was installed. Idempotent."""
    if cuda_device_present():
        return False
    if any(isinstance(f, _StubFinder) for f in sys.meta_path):
        return True
    sys.meta_path.insert(0, _StubFinder())
    sys.meta_path.insert(0, _ParallelStateFinder())
    if PARALLEL_STATE in sys.modules:  # imported before the shim: patch it now
        module = sys.modules[PARALLEL_STATE]
        if not getattr(module.init_model_parallel_group, "bacon_cpu_shim", False):
            module.init_model_parallel_group = without_cuda_communicators(
                module.init_model_parallel_group
            )
    return True


def cpu_engine_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a process that runs SGLang's engine on CPU with this shim."""
    env = dict(os.environ if base is None else base)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    # SGLang wraps a few helpers in torch.compile (the vision rotary embedding among them):
    # on CPU, TorchInductor compiles them to C++ with g++ on the first image request, 30-45 s
    # on a fresh 2-core machine (cached afterwards) for no speed-up at these sizes. Eager.
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    paths = [str(SHIM_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env
