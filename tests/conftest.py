"""Shared fixtures: the built-in tiny model and CPU-engine helpers."""

from __future__ import annotations

import os

import pytest

from bacon_sglang import cpu_shim

# The whole session (and the SGLang servers it starts, which inherit the environment) runs
# the Triton kernels in Triton's interpreter on CPU: the kernel tests compare them with their
# references, and the engine tests then run the same kernels inside SGLang. Set before
# anything imports triton (sglang does). One BLAS thread: interpreted dots otherwise fight
# torch's threads for the 2 cores.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU, SGLang's modules import only with the CPU engine and the sgl_kernel stand-in.
if cpu_shim.install():
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")


@pytest.fixture(scope="session")
def sglang_hooks():
    """Load SGLang's plugins in this process (so bacon-sglang's hooks are applied)."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    from bacon_sglang import patches

    load_plugins()
    patches.register_all()
    HookRegistry.apply_hooks()
    assert patches.unapplied_targets() == []
    return HookRegistry


@pytest.fixture(scope="session")
def tiny_model_path():
    """Path of the built-in tiny Qwen2-VL model (built once, cached under <repo>/.cache)."""
    from bacon_sglang.models.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared CPU (5x slower)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def kernel_device() -> str:
    """Where the Triton kernels run: CPU in the interpreter, else CUDA."""
    import torch

    from bacon_sglang import kernels

    if kernels.interpreted():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set and there is no GPU")


@pytest.fixture(scope="module")
def processor(tiny_model_path):
    """The built-in tiny model's processor (tokenizer + image processor)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def hf_model(tiny_model_path):
    """The built-in tiny model in transformers (fp32, SDPA): the decode reference."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        tiny_model_path, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval()


@pytest.fixture(scope="module")
def hf_eager(tiny_model_path):
    """The same model with eager attention, whose attention weights the reference keep-sets
    are recomputed from."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        tiny_model_path, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()
