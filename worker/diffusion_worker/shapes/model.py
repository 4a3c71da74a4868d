"""The `builtin:shapes` pipeline: a standard StableDiffusionPipeline, small enough for a CPU.

A 64x64 image is a 16x16x4 latent of a small AutoencoderKL; a small UNet2DConditionModel denoises
it, conditioned by a small CLIPTextModel. The tokenizer is CLIP's byte-level BPE built locally, with
merges that make every grammar word one token (other text still tokenizes, byte by byte).
"""

from __future__ import annotations

from typing import Any

from diffusion_worker.shapes.dataset import IMAGE_SIZE, VOCABULARY
from diffusion_worker.tiny_model import assemble_sd_pipeline, build_clip_tokenizer_vocab

TOKENIZER_MAX_LENGTH = 24
TEXT_HIDDEN_SIZE = 64
# One layer. CLIP's text encoder is causal, so with a layer every state after the colour word has
# seen colour and shape together, and the UNet reads the colour from those states (splice in another
# prompt's states from the shape word on and it draws that prompt's colour). A held-out pair is then
# a state the UNet never saw: in three of five one-layer runs "yellow diamond" was wrong on 15 to 27
# of 32 seeds, mostly drawn as a circle.
# With no layer (`--text-layers 0`: each word's state is its embedding plus its position) shapes
# generalised but colours did not: the held-out purple cross came out blue (right on 0 to 2 of 32
# seeds) in three of six runs (bench/results/shapes-text-encoder-xeon2-2026-11-30.json;
# docs/shapes-model.md).
# Two layers: held-out 0.825 in the one run tried.
TEXT_LAYERS = 1
# The prompt also enters every ResNet block through the time embedding (attention-pooled text, as in
# Kandinsky's "text" addition embedding): what shape and colour to draw is a global decision, which
# cross-attention at low resolution alone learned slowly. Without it (`--no-pooled-prompt`, with no
# text layer) 3 of 6 runs reached 0.9 on held-out pairs: no better (docs/shapes-model.md).
POOLED_PROMPT = True
LATENT_CHANNELS = 4
VAE_BLOCKS = (16, 32, 32)
VAE_SCALE = 2 ** (len(VAE_BLOCKS) - 1)
DEFAULT_STEPS = 15
DEFAULT_GUIDANCE = 5.0


def word_merges(words: tuple[str, ...] = VOCABULARY) -> tuple[list[tuple[str, str]], list[str]]:
    """BPE merges that join each word's letters left to right, and the tokens they create.

    Longer words' merges rank first, so a short word's merge (the "t o" of "top") cannot split a
    longer word that contains it ("bottom"); a unit test checks every word ends up one token.
    """
    merges: list[tuple[str, str]] = []
    tokens: list[str] = []
    for word in sorted(words, key=lambda word: (-len(word), word)):
        if len(word) < 2:
            continue
        prefix = word[0]
        for index, letter in enumerate(word[1:], start=1):
            last = index == len(word) - 1
            right = letter + "</w>" if last else letter
            merges.append((prefix, right))
            prefix += letter
            tokens.append(prefix + "</w>" if last else prefix)
    return list(dict.fromkeys(merges)), list(dict.fromkeys(tokens))


def build_tokenizer() -> Any:
    """CLIPTokenizer over bytes plus one token per grammar word."""
    from transformers import CLIPTokenizer

    vocab = build_clip_tokenizer_vocab()
    merges, tokens = word_merges()
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TOKENIZER_MAX_LENGTH)


def build_text_encoder(vocab_size: int, bos: int, eos: int, layers: int = TEXT_LAYERS) -> Any:
    """A small CLIP text transformer (`layers` deep), trained from scratch with the UNet."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN_SIZE,
            intermediate_size=4 * TEXT_HIDDEN_SIZE,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=TOKENIZER_MAX_LENGTH,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )


def build_vae() -> Any:
    """An AutoencoderKL that maps 64x64x3 to 16x16x4 (no attention: flat shapes do not need it)."""
    from diffusers import AutoencoderKL

    blocks = len(VAE_BLOCKS)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=VAE_BLOCKS,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_unet(pooled_prompt: bool = POOLED_PROMPT) -> Any:
    """A three-level UNet over 16x16 latents; the prompt enters by cross-attention at 8x8 and 4x4,
    where self-attention also sees the whole image (a shape's outline is a global decision), and
    with `pooled_prompt` through the time embedding too."""
    from diffusers import UNet2DConditionModel

    pooled: dict[str, Any] = (
        {"addition_embed_type": "text", "addition_embed_type_num_heads": 4} if pooled_prompt else {}
    )
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // VAE_SCALE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        # 32 channels at 16x16 (48 until v9): with 1500 autoencoder steps instead of 2000, training
        # takes 18 instead of 20 min on a 2-core Xeon. Not better: 1 of 4 seeds passes (v8: 2 of 4);
        # v9 is the default because its seed 0 passed where make train-demo-model runs now
        # (docs/shapes-model.md).
        block_out_channels=(32, 96, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=4,
        norm_num_groups=16,
        **pooled,
    )


def build_scheduler() -> Any:
    """DPM-Solver++ with v-prediction on a zero-terminal-SNR schedule: the last step is pure noise,
    so the model learns to choose the background colour itself instead of reading it from leaked
    signal (which sampling from pure noise never provides)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        steps_offset=1,
        final_sigmas_type="zero",
    )


def assemble_pipeline(tokenizer: Any, text_encoder: Any, vae: Any, unet: Any, scheduler: Any) -> Any:
    """The parts as a StableDiffusionPipeline (no safety checker: the model draws only shapes)."""
    return assemble_sd_pipeline(tokenizer, text_encoder, vae, unet, scheduler)
