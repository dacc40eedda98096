"""A tiny, randomly initialised Qwen2-VL checkpoint, built on the spot and fully offline.

Nothing can be fetched from a model hub here, so tests and CPU benchmarks use a model this
module writes itself: the Qwen2-VL architecture (M-RoPE language model + ViT vision tower with
a 2x2 patch merger) at toy size, with seeded random weights and a byte-level BPE tokenizer
trained in well under a second on a small built-in English corpus.

The files follow the layout of the hub checkpoint ``Qwen/Qwen2-VL-7B-Instruct`` so that
transformers (``Qwen2VLForConditionalGeneration`` + ``AutoProcessor``) and SGLang's
``sglang.srt.models.qwen2_vl`` load it through the same code paths as the real model::

    config.json                   flat text keys, nested vision_config, rope_scaling.mrope_section
    model.safetensors             bf16; original names: model.layers.*, visual.*, lm_head.weight
    generation_config.json        eos = [<|im_end|>, <|endoftext|>], greedy
    tokenizer.json                byte-level BPE, Qwen2 pre-tokenizer, special tokens at the end
    tokenizer_config.json         Qwen2Tokenizer, eos <|im_end|>, pad <|endoftext|>, chat template
    chat_template.json / .jinja   Qwen2-VL's template (<|vision_start|><|image_pad|><|vision_end|>)
    preprocessor_config.json      Qwen2VLImageProcessor: 28x28 pixels per LLM token
    video_preprocessor_config.json  Qwen2VLVideoProcessor

Usage::

    python -m bacon_sglang.models.tiny OUT_DIR [--seed N] [--force]

or, from Python, :func:`ensure_tiny_model` (cached under ``<repo>/.cache/models``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.trainers import BpeTrainer

logger = logging.getLogger(__name__)

# Bump when the files written change in a way the spec does not capture (cache key).
BUILDER_VERSION = 1

# Qwen2's special tokens, in Qwen2's order; they follow the BPE vocabulary, as in Qwen2.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2's pre-tokenizer split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-VL-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# OpenAI CLIP normalisation, as in Qwen2-VL's preprocessor_config.json.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Training text for the tokenizer: plain English about pictures, scenes and everyday things,
# plus the words the chat template and typical prompts use.
CORPUS = """\
You are a helpful assistant. Describe this image in detail. What is shown in the picture?
The user asks a question about the image and the assistant answers it briefly and clearly.
A small brown dog is sitting on a green lawn next to a red ball and a wooden fence.
Two children are playing with a kite on the beach while the waves roll onto the sand.
The kitchen table holds a bowl of apples, a loaf of bread, three cups and a glass of milk.
A tall building with many windows stands behind a busy street full of cars and buses.
In the background there are mountains covered with snow under a clear blue sky.
The cat sleeps on the sofa near the window, where the afternoon sun warms the cushions.
How many people are in the photo? There are four people: two women, a man and a child.
What color is the car? The car is yellow, with black tires and a silver bumper.
Read the text on the sign. The sign says that the museum opens at nine in the morning.
The chart shows that sales grew every month from January to June and then fell in July.
A chef in a white hat is cutting vegetables: carrots, onions, peppers and tomatoes.
The train leaves the station at half past seven and arrives in the city before noon.
Birds fly over the lake at sunset, and the water reflects the orange and purple clouds.
The old bridge crosses the river between the market square and the quiet village church.
A woman wearing a blue jacket rides a bicycle along a path lined with tall trees.
On the desk there is a laptop, a notebook, a pen, a lamp and a cup of hot coffee.
The football players run across the field while the crowd cheers in the stadium.
Snow falls on the roofs of the houses, and smoke rises slowly from the chimneys.
The garden is full of flowers: roses, tulips, daisies and sunflowers of every size.
A man is reading a newspaper on a bench in the park, and pigeons walk around his feet.
The map shows the roads, rivers and forests of the region, with the capital in the north.
Compare the two images and explain the difference between the left one and the right one.
The left picture was taken during the day; the right picture shows the same place at night.
Answer with a single word. Answer with a number. Answer yes or no, then explain why.
The boat is anchored in the harbor, its white sails folded and its deck still wet with rain.
Please summarize the document in three sentences and list the most important numbers.
The table has five rows and four columns; the last column gives the total for each row.
A horse and a cow stand in the meadow beside a red barn and an old stone wall.
Scientists study the cells under a microscope and record what they observe each hour.
The phone screen displays a message, the time, the battery level and the weather forecast.
An airplane takes off from the airport as the evening lights turn on along the runway.
The library is quiet; students read books, write essays and search for information online.
She opened the door, looked outside, and saw that the storm had finally passed.
He carried the heavy box up the stairs, put it on the floor and sat down to rest.
They walked through the forest, listening to the wind in the leaves and the songs of birds.
We measured the length, the width and the height of the room before buying the carpet.
Small details matter: the shadow on the wall, the reflection in the mirror, the open book.
The video shows a person walking into the room, picking up a bottle and leaving again.
First, look at the whole scene. Second, find the main object. Third, describe its position.
The object in the center is a round clock; above it hangs a painting of a sailing ship.
Zero, one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, hundred.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are days of the week.
Spring, summer, autumn and winter; morning, afternoon, evening and night; today, tomorrow.
Red, orange, yellow, green, blue, purple, pink, brown, black, white, gray and gold.
Big, small, long, short, young, old, new, bright, dark, warm, cold, fast, slow, happy, sad.
Above, below, behind, beside, between, inside, outside, near, far, left, right, top, bottom.
The quick brown fox jumps over the lazy dog, and the dog does not seem to notice at all.
Questions: who, what, where, when, why, which and how. Answers should be short and correct.
The model reads the image tokens first and then the text of the question that follows them.
Attention helps the model decide which parts of the picture matter for the current answer.
Memory is limited, so a long context must be compressed while keeping the useful tokens.
The engine schedules requests, stores keys and values in a cache, and decodes new tokens.
This is a test. Hello world! It's a nice day, isn't it? I'm sure we'll see; they've left.
"""


@dataclass(frozen=True)
class TinyQwen2VLSpec:
    """Every setting of the tiny model; its hash names the cache folder.

    ``head_dim = hidden_size // num_attention_heads`` (transformers' Qwen2-VL requires it).
    ``sum(mrope_section)`` must be ``head_dim // 2`` (temporal, height, width rotary pairs).
    The vision tower's output (``vision_config.hidden_size``) is ``hidden_size``.
    """

    # Language model (Qwen2 decoder with M-RoPE).
    num_hidden_layers: int = 4
    hidden_size: int = 256
    intermediate_size: int = 512
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    mrope_section: tuple[int, int, int] = (8, 12, 12)
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    bpe_vocab_size: int = 1010  # + 14 special tokens = 1024
    # Vision tower (ViT with 2D RoPE, 2x2 patch merger into the LM hidden size).
    vision_depth: int = 2
    vision_embed_dim: int = 128
    vision_num_heads: int = 2
    vision_mlp_ratio: int = 4
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    # Image processor: pixels are counted in units of one LLM token (28 x 28 after merging).
    min_image_tokens: int = 4
    max_image_tokens: int = 1024
    min_video_tokens: int = 4
    max_video_tokens: int = 256

    @property
    def head_dim(self) -> int:
        """Per-head width of the language model's attention."""
        return self.hidden_size // self.num_attention_heads

    @property
    def pixels_per_token(self) -> int:
        """Image pixels behind one LLM token: ``(patch_size * spatial_merge_size) ** 2``."""
        return (self.patch_size * self.spatial_merge_size) ** 2

    def validate(self) -> None:
        """Raise ``ValueError`` when the settings cannot form a consistent Qwen2-VL model."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"sum(mrope_section) must be head_dim // 2 = {self.head_dim // 2}")
        if self.vision_embed_dim % self.vision_num_heads:
            raise ValueError("vision_embed_dim must be a multiple of vision_num_heads")

    def cache_key(self, seed: int) -> str:
        """Short hash of the settings, corpus, template, ``seed`` and ``tokenizers`` version.

        (BPE training may change between ``tokenizers`` releases; the weights do not depend
        on any library version.)
        """
        blob = json.dumps(
            {
                "builder": BUILDER_VERSION,
                "tokenizers": tokenizers.__version__,
                "spec": dataclasses.asdict(self),
                "seed": seed,
                "corpus": CORPUS,
                "template": CHAT_TEMPLATE,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


DEFAULT_SPEC = TinyQwen2VLSpec()


# --- tokenizer -------------------------------------------------------------------------------


def build_tokenizer(spec: TinyQwen2VLSpec = DEFAULT_SPEC) -> Tokenizer:
    """Train Qwen2's byte-level BPE pipeline on :data:`CORPUS`, then append the special tokens.

    Regular tokens get ids ``[0, n)``, the special tokens ``[n, n + 14)`` in Qwen2's order.
    Training is deterministic (same corpus, same settings -> same ``tokenizer.json``).
    """
    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=spec.bpe_vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != spec.bpe_vocab_size:
        raise ValueError(
            f"the corpus supports only {tok.get_vocab_size()} BPE tokens, "
            f"not bpe_vocab_size={spec.bpe_vocab_size}"
        )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _token_ids(tok: Tokenizer) -> dict[str, int]:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise RuntimeError(f"special tokens missing from the tokenizer: {missing}")
    return ids


def _tokenizer_config(ids: dict[str, int], spec: TinyQwen2VLSpec) -> dict:
    """``tokenizer_config.json`` in the layout of Qwen2-VL-7B-Instruct's."""
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[t]): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        },
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": spec.max_position_embeddings,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# --- model config and weights ----------------------------------------------------------------


def _model_config(spec: TinyQwen2VLSpec, ids: dict[str, int], vocab_size: int) -> dict:
    """``config.json`` in the hub's flat Qwen2-VL layout.

    SGLang's ``Qwen2VisionTransformer`` reads ``vision_config.in_chans`` (the hub name;
    transformers' ``Qwen2VLVisionConfig`` calls it ``in_channels``), so both are written.
    ``rope_scaling`` carries ``mrope_section``: SGLang enables M-RoPE only when it is present.
    """
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "max_window_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(spec.mrope_section)},
        "sliding_window": spec.max_position_embeddings,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab_size,
        "vision_config": {
            "depth": spec.vision_depth,
            "embed_dim": spec.vision_embed_dim,
            "hidden_size": spec.hidden_size,
            "hidden_act": "quick_gelu",
            "mlp_ratio": spec.vision_mlp_ratio,
            "num_heads": spec.vision_num_heads,
            "in_chans": 3,
            "in_channels": 3,
            "patch_size": spec.patch_size,
            "spatial_merge_size": spec.spatial_merge_size,
            "temporal_patch_size": spec.temporal_patch_size,
        },
    }


def weight_shapes(spec: TinyQwen2VLSpec, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, under the hub's (pre-transformers-v5) names.

    These are the names SGLang's ``Qwen2VLForConditionalGeneration.load_weights`` expects
    verbatim (``model.*``, ``visual.*``, ``lm_head.*``; it folds q/k/v and gate/up itself and
    renames ``attn.qkv`` to ``attn.qkv_proj``); transformers v5 maps them to its
    ``model.language_model.*`` / ``model.visual.*`` layout on load.
    """
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_attention_heads * d, spec.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, h)}
    for n in range(spec.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab_size, h)

    e, m = spec.vision_embed_dim, spec.vision_embed_dim * spec.vision_mlp_ratio
    merged = e * spec.spatial_merge_size**2
    ps, tps = spec.patch_size, spec.temporal_patch_size
    shapes["visual.patch_embed.proj.weight"] = (e, 3, tps, ps, ps)
    for n in range(spec.vision_depth):
        p = f"visual.blocks.{n}."
        shapes |= {
            p + "norm1.weight": (e,),
            p + "norm1.bias": (e,),
            p + "attn.qkv.weight": (3 * e, e),
            p + "attn.qkv.bias": (3 * e,),
            p + "attn.proj.weight": (e, e),
            p + "attn.proj.bias": (e,),
            p + "norm2.weight": (e,),
            p + "norm2.bias": (e,),
            p + "mlp.fc1.weight": (m, e),
            p + "mlp.fc1.bias": (m,),
            p + "mlp.fc2.weight": (e, m),
            p + "mlp.fc2.bias": (e,),
        }
    shapes |= {
        "visual.merger.ln_q.weight": (e,),
        "visual.merger.ln_q.bias": (e,),
        "visual.merger.mlp.0.weight": (merged, merged),
        "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (h, merged),
        "visual.merger.mlp.2.bias": (h,),
    }
    return shapes


def random_weights(spec: TinyQwen2VLSpec, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random bf16 weights; each tensor has its own generator seeded by (seed, name).

    Matrices are N(0, 1/fan_in) so activations stay O(1) and attention is far from uniform
    (the compression policies need scores with structure). Embeddings are N(0, 1). Norm
    scales are 1 + N(0, 0.1^2) and biases N(0, 0.02^2): neither is left at its trivial value, so
    a weight that fails to load, or a norm convention that differs, changes the outputs.

    Values are rounded to bf16 and stored as bf16, so a ``float32`` run and a ``bfloat16`` run
    start from exactly the same parameters.
    """
    out: dict[str, torch.Tensor] = {}
    for name, shape in weight_shapes(spec, vocab_size).items():
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        if name.endswith("embed_tokens.weight"):
            pass
        elif "norm" in name or "ln_q" in name:
            x = 1.0 + 0.1 * x if name.endswith("weight") else 0.02 * x
        elif name.endswith("bias"):
            x = 0.02 * x
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            x = x / fan_in**0.5
        out[name] = x.to(torch.bfloat16).contiguous()
    return out


# --- processor configs -----------------------------------------------------------------------


def _preprocessor_config(spec: TinyQwen2VLSpec) -> dict:
    """``preprocessor_config.json``: ``min/max_pixels`` count whole 28x28 LLM tokens."""
    min_pixels = spec.min_image_tokens * spec.pixels_per_token
    max_pixels = spec.max_image_tokens * spec.pixels_per_token
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": spec.patch_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.spatial_merge_size,
    }


def _video_preprocessor_config(spec: TinyQwen2VLSpec) -> dict:
    """``video_preprocessor_config.json`` (transformers v5 keeps the video processor apart)."""
    cfg = _preprocessor_config(spec)
    del cfg["image_processor_type"]
    min_pixels = spec.min_video_tokens * spec.pixels_per_token
    max_pixels = spec.max_video_tokens * spec.pixels_per_token
    cfg |= {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
    }
    return cfg


# --- writing ---------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def write_tiny_model(
    out_dir: str | Path, seed: int = 0, spec: TinyQwen2VLSpec = DEFAULT_SPEC
) -> Path:
    """Write the complete model directory into ``out_dir`` (created; must be empty or absent).

    Deterministic: the same ``seed`` and ``spec`` give byte-identical files.
    """
    spec.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")

    tok = build_tokenizer(spec)
    ids = _token_ids(tok)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)

    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(ids, spec))
    _write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    _write_json(out / "preprocessor_config.json", _preprocessor_config(spec))
    _write_json(out / "video_preprocessor_config.json", _video_preprocessor_config(spec))

    _write_json(out / "config.json", _model_config(spec, ids, vocab_size))
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "do_sample": False,
        },
    )
    save_file(
        random_weights(spec, vocab_size, seed),
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    out.chmod(0o755)  # mkdtemp makes 0700 dirs; the model is meant to be shared
    for f in out.iterdir():
        f.chmod(0o644)
    logger.debug("wrote tiny Qwen2-VL (seed %d, vocab %d) to %s", seed, vocab_size, out)
    return out


def _default_cache_root() -> Path:
    """``<repo>/.cache/models`` in a source checkout, else ``~/.cache/bacon_sglang/models``."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "models"
    return Path.home() / ".cache" / "bacon_sglang" / "models"


def default_model_path(seed: int = 0, spec: TinyQwen2VLSpec = DEFAULT_SPEC) -> Path:
    """Where :func:`ensure_tiny_model` caches the model for ``seed`` and ``spec``."""
    return _default_cache_root() / f"tiny-qwen2vl-{spec.cache_key(seed)}"


def _holds_model(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _build_atomically(path: Path, seed: int, spec: TinyQwen2VLSpec, force: bool) -> Path:
    """Build in a sibling temp dir and rename it into place, so no reader sees a half model.

    Concurrent builders race on the final ``rename``; the loser discards its copy and uses the
    winner's (identical, by determinism). An interrupted build leaves only a hidden
    ``.<name>.tmp-*`` sibling. An empty ``path`` is replaced; with ``force`` any ``path`` is.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_tiny_model(tmp, seed=seed, spec=spec)
        if force and path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, path)  # atomic; replaces an empty directory, fails on a full one
        except OSError as exc:
            if not _holds_model(path):
                raise FileExistsError(f"{path} exists and does not hold a model") from exc
            logger.info("another process built %s first; using it", path)
        else:
            logger.info("built tiny Qwen2-VL (seed %d) at %s", seed, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_tiny_model(
    path: str | Path | None = None, seed: int = 0, spec: TinyQwen2VLSpec = DEFAULT_SPEC
) -> Path:
    """Return a directory holding the tiny Qwen2-VL model, building it first if needed.

    ``path=None`` uses ``<repo>/.cache/models/tiny-qwen2vl-<hash of settings and seed>``. A
    directory that already holds ``config.json`` and ``model.safetensors`` is reused as is
    (builds are renamed into place whole, so a complete-looking directory is complete). Safe
    to call from several processes or threads at once. Raises ``FileExistsError`` when
    ``path`` is a non-empty directory without a model.
    """
    target = Path(path) if path is not None else default_model_path(seed, spec)
    if _holds_model(target):
        return target
    return _build_atomically(target, seed, spec, force=False)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m bacon_sglang.models.tiny [OUT_DIR] [--seed N] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="python -m bacon_sglang.models.tiny", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "out_dir", nargs="?", type=Path, help="target directory (default: the repo's model cache)"
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    target = args.out_dir if args.out_dir is not None else default_model_path(args.seed)
    if target.exists() and any(target.iterdir()) and not args.force:
        parser.error(f"{target} exists and is not empty (use --force to replace it)")
    print(_build_atomically(target, args.seed, DEFAULT_SPEC, force=args.force))


if __name__ == "__main__":
    main()
