"""A tiny Stable Diffusion pipeline with random weights, built locally (no download).

Used by tests, benchmarks and `builtin:tiny-sd`: it exercises the same loading and calling code as
a real Hub model, in about 100 ms per image on a CPU. It draws noise, not pictures.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

TOKENIZER_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE (as in GPT-2 and CLIP)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def build_clip_tokenizer_vocab() -> dict[str, int]:
    """A byte-level CLIP vocabulary with no merges: every byte is a token, alone or word-final."""
    characters = list(bytes_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def assemble_sd_pipeline(tokenizer: Any, text_encoder: Any, vae: Any, unet: Any, scheduler: Any) -> Any:
    """The parts as a StableDiffusionPipeline, without a safety checker (built-in models only)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pipeline(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny StableDiffusionPipeline to `directory` with `save_pretrained`; returns it.

    The directory appears whole or not at all: the pipeline is written next to it, then renamed.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    vocab = build_clip_tokenizer_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TOKENIZER_MAX_LENGTH)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TOKENIZER_MAX_LENGTH,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = assemble_sd_pipeline(tokenizer, text_encoder, vae, unet, scheduler)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Named after `directory`, so that when `directory` is itself a staging folder (the model
    # cache's `.NAME.partial-*`) the cache's clean-up of a killed process's leftovers finds this too.
    staging = Path(tempfile.mkdtemp(prefix=f"{directory.name}.tmp-", dir=directory.parent))
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / "BUILTIN.json").write_text(json.dumps({"builder": "tiny-sd", "seed": seed}) + "\n")
        staging.replace(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
