"""A tiny pipeline with a real diffusers safety checker whose verdict the test chooses."""

from __future__ import annotations

from pathlib import Path


def with_safety_checker(model_dir: Path, directory: Path, *, flags_every_image: bool) -> Path:
    """`model_dir`'s Stable Diffusion pipeline plus a tiny random-weight
    `StableDiffusionSafetyChecker` and its CLIP image processor, saved with `save_pretrained` to
    `directory` (so the worker loads it like a Hub checkpoint that ships a checker).

    The checker flags an image when the cosine similarity of its embedding to one of its concept
    embeddings exceeds that concept's weight. Similarity lies in [-1, 1], so weights of -1.5 flag
    every image and 1.5 none, whatever the random weights make of the picture."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config)
    weight = -1.5 if flags_every_image else 1.5
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(weight)
        checker.special_care_embeds_weights.fill_(weight)
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir)
    pipeline.register_modules(safety_checker=checker, feature_extractor=extractor)
    pipeline.register_to_config(requires_safety_checker=True)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory
