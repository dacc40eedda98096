"""The tiny Qwen2-VL builder: deterministic, offline, and loadable by transformers and SGLang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bacon_sglang.models.tiny import (
    DEFAULT_SPEC,
    SPECIAL_TOKENS,
    default_model_path,
    ensure_tiny_model,
    weight_shapes,
    write_tiny_model,
)

# Everything here is local; make any accidental hub access fail instead of hang. Set before
# transformers is imported (it is imported lazily, in the tests that need it).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
VOCAB = DEFAULT_SPEC.bpe_vocab_size + len(SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def processor(model_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    from transformers import Qwen2VLForConditionalGeneration

    model, info = Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def _image(size: int) -> Image.Image:
    g = torch.Generator().manual_seed(size)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _chat(processor, image: Image.Image, text: str = "Describe this image.") -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>Describe this image." in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    return processor(text=[prompt], images=[image], return_tensors="pt")


# --- builder ---------------------------------------------------------------------------------


def test_builder_is_deterministic(tmp_path: Path) -> None:
    a, b, c = (write_tiny_model(tmp_path / n, seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    assert _files(a) == _files(b)
    files_a, files_c = _files(a), _files(c)
    assert files_a.keys() == files_c.keys()
    assert files_a["tokenizer.json"] == files_c["tokenizer.json"]  # the seed moves weights only
    assert files_a["model.safetensors"] != files_c["model.safetensors"]


def test_checkpoint_layout(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(model_dir / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == weight_shapes(DEFAULT_SPEC, VOCAB)
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}

    assert config["vocab_size"] == VOCAB
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # head_dim
    assert sum(config["rope_scaling"]["mrope_section"]) == 32  # head_dim / 2
    assert config["vision_config"]["hidden_size"] == config["hidden_size"]
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    for key, token in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
        ("eos_token_id", "<|im_end|>"),
    ]:
        assert config[key] == added[token], key


def test_ensure_reuses_and_survives_concurrent_builds(tmp_path: Path) -> None:
    target = tmp_path / "shared"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_tiny_model(target))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 3
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no temp dirs left behind
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(target) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp


def test_default_path_is_keyed_by_settings() -> None:
    path = default_model_path()
    assert path.name.startswith("tiny-qwen2vl-")
    assert path.parent == REPO / ".cache" / "models"
    assert default_model_path(seed=1) != path


def test_cli_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    from bacon_sglang.models.tiny import main

    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    main([str(tmp_path), "--force", "--seed", "3"])
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "keep.txt").exists()


# --- transformers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Describe this image in detail.",
        "Hello world! It's 2024, isn't it?\n\tTabs,  spaces and ünïcödé 🙂.",
        "<|im_start|>user\nWhat is shown?<|im_end|>\n",
    ],
)
def test_tokenizer_round_trips(model_dir: Path, text: str) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids == Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids
    assert len(tok) == VOCAB
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in SPECIAL_TOKENS:
        assert tok.convert_ids_to_tokens(tok(special)["input_ids"]) == [special]


@pytest.mark.parametrize(("size", "image_tokens"), [(448, 256), (224, 64)])
def test_chat_template_expands_image_pads(processor, size: int, image_tokens: int) -> None:
    inputs = _chat(processor, _image(size))
    pads = (inputs["input_ids"][0] == processor.image_token_id).sum().item()
    assert pads == image_tokens
    assert inputs["image_grid_thw"].tolist() == [[1, size // 14, size // 14]]
    assert inputs["pixel_values"].shape == (4 * image_tokens, 3 * 2 * 14 * 14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_generates(hf_model, processor, dtype: torch.dtype) -> None:
    model = hf_model.to(dtype)
    inputs = _chat(processor, _image(224))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert 0 < len(new) <= 4
    assert all(0 <= t < VOCAB for t in new.tolist())
    hf_model.to(torch.float32)


# --- SGLang ----------------------------------------------------------------------------------

# Run in a subprocess: it initialises torch.distributed and SGLang's process-wide config.
_SGLANG_CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file
    from sglang.srt.utils.hf_transformers_utils import get_config
    from sglang.test.layer_ut_utils import init_single_process_dist

    path = sys.argv[1]
    init_single_process_dist()
    from sglang.srt.models.qwen2_vl import Qwen2VLForConditionalGeneration as SglQwen2VL

    config = get_config(path, trust_remote_code=False)
    model = SglQwen2VL(config).float()
    ckpt = load_file(f"{path}/model.safetensors")
    model.load_weights(ckpt.items())

    folded = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
              "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "attn.qkv.": "attn.qkv_proj."}
    expected = set()
    for name in ckpt:
        old = next((o for o in folded if o in name), None)
        expected.add(name.replace(old, folded[old]) if old else name)
    params = dict(model.named_parameters())

    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration
    hf = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (224, 224, 3), generator=g, dtype=torch.uint8).numpy()
    px = AutoProcessor.from_pretrained(path).image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        ours = model.visual(px["pixel_values"], grid_thw=px["image_grid_thw"])
        ref = hf.model.visual(px["pixel_values"], grid_thw=px["image_grid_thw"])
    ref = getattr(ref, "pooler_output", ref)
    print(json.dumps({
        "mrope": model.is_mrope_enabled,
        "missing": sorted(set(params) - expected),
        "unexpected": sorted(expected - set(params)),
        "vision_shape": list(ours.shape),
        "vision_max_diff": (ours - ref).abs().max().item(),
    }))
    """
)


@pytest.mark.engine
def test_sglang_builds_and_loads_the_model(model_dir: Path) -> None:
    """SGLang's Qwen2-VL class takes the config and every tensor; its vision tower matches HF's.

    Needs the CPU shim on a GPU-less machine (SGLang imports ``sgl_kernel``); ~15 s.
    """
    cpu_shim = pytest.importorskip("bacon_sglang.cpu_shim")
    env = cpu_shim.cpu_engine_env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(REPO)])
    proc = subprocess.run(
        [sys.executable, "-c", _SGLANG_CHECK, str(model_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mrope"]
    assert result["missing"] == [] and result["unexpected"] == []
    assert result["vision_shape"] == [64, DEFAULT_SPEC.hidden_size]  # 224x224 -> 64 tokens
    assert result["vision_max_diff"] < 1e-4
