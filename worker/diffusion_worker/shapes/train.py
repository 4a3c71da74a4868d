"""Trains `builtin:shapes` on a CPU and writes it with save_pretrained: `make train-demo-model`.

Two stages, both seeded: an autoencoder learns to squeeze 64x64 images into 16x16x4 latents, then
the UNet and text encoder learn v-prediction on those latents (prompts dropped 10% of the time for
classifier-free guidance). The exponential moving average of the weights is what gets saved, with
training.json beside it (the command, seed, steps, wall time and measured adherence) and
worker_defaults.json (the steps and guidance the worker uses when a request gives none).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_worker.model_source import WORKER_DEFAULTS_FILE
from diffusion_worker.shapes import WEIGHTS_DIR, dataset, evaluate, model

log = logging.getLogger("diffusion_worker.shapes.train")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; the defaults are the run whose weights are committed."""
    parser = argparse.ArgumentParser(prog="python -m diffusion_worker.shapes.train", description=__doc__)
    parser.add_argument("--output", type=Path, default=WEIGHTS_DIR, help="pipeline directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (use 1 on a 2-core CPU that is busy)"
    )
    parser.add_argument(
        "--vae-steps", type=int, default=1500, help="autoencoder steps (0 with --resume: keep its decoder)"
    )
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument(
        "--vae-crop",
        type=int,
        default=32,
        help="train the autoencoder on random crops this size (it is convolutional: edges are local, "
        "and a 32x32 crop costs a quarter of the full image)",
    )
    parser.add_argument("--steps", type=int, default=2500, help="UNet + text encoder steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--text-layers",
        type=int,
        default=model.TEXT_LAYERS,
        help="transformer layers of the text encoder (0: each word's state is its embedding plus its "
        "position, untouched by the words around it; fewer layers mix words less)",
    )
    parser.add_argument(
        "--pooled-prompt",
        action=argparse.BooleanOptionalAction,
        default=model.POOLED_PROMPT,
        help="also feed the attention-pooled prompt to every UNet block through the time embedding "
        "(--no-pooled-prompt: the words reach the UNet by cross-attention only)",
    )
    parser.add_argument(
        "--snr-gamma",
        type=float,
        default=5.0,
        help="down-weight the low-noise steps (SNR above this) as in Min-SNR (Hang et al., 2023), "
        "so training time goes to the noise levels where outlines are decided",
    )
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights")
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue from this pipeline directory: the VAE decoder (encoder frozen, so the latent "
        "space the UNet learned stays put), then the UNet and text encoder",
    )
    parser.add_argument(
        "--vae-from",
        type=Path,
        default=None,
        help="take the autoencoder from this pipeline directory instead of training one "
        "(to try UNet settings without repeating stage 1)",
    )
    parser.add_argument(
        "--eval-seeds",
        type=int,
        default=8,
        help="seeds per prompt in the final measurement (0: no measurement; training.json says null)",
    )
    args = parser.parse_args(argv)
    for name in ("threads", "vae_batch", "vae_crop", "steps", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("vae_steps", "eval_seeds"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    return args


def lr_at(step: int, total: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def random_crop(images: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One random `size` x `size` window of a (B, C, H, W) batch (the whole batch when it is larger)."""
    height, width = images.shape[-2:]
    if size >= min(height, width):
        return images
    top, left = (int(rng.integers(0, extent - size + 1)) for extent in (height, width))
    return np.ascontiguousarray(images[..., top : top + size, left : left + size])


def edge_loss(reconstruction: Any, target: Any) -> Any:
    """L1 between neighbouring-pixel differences: blurred edges cost as much as wrong colours, which
    keeps corners (what tells a diamond from a circle) sharp."""
    loss = 0
    for dim in (-1, -2):
        loss = loss + (reconstruction.diff(dim=dim) - target.diff(dim=dim)).abs().mean()
    return loss


def train_autoencoder(args: argparse.Namespace, rng: np.random.Generator) -> Any:
    """Stage 1: the VAE, on reconstruction (L1 + MSE + edges) of random crops, with a small KL term."""
    import torch
    from diffusers import AutoencoderKL

    if args.vae_from:
        return AutoencoderKL.from_pretrained(args.vae_from / "vae").eval().requires_grad_(False)
    if args.resume:
        vae = AutoencoderKL.from_pretrained(args.resume / "vae")
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    else:
        vae = model.build_vae()
    trainable = [parameter for parameter in vae.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.vae_lr, weight_decay=0.0, fused=True)
    started = time.monotonic()
    for step in range(args.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr)
        images = dataset.autoencoder_batch(rng, args.vae_batch)
        pixels = torch.from_numpy(random_crop(images, args.vae_crop, rng))
        posterior = vae.encode(pixels).latent_dist
        # Resumed: the decoder learns to draw the mean latents, which is what the UNet produces.
        reconstruction = vae.decode(posterior.mean if args.resume else posterior.sample()).sample
        error = reconstruction - pixels
        loss = (
            error.abs().mean()
            + error.pow(2).mean()
            + edge_loss(reconstruction, pixels)
            + 1e-6 * posterior.kl().mean()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            log.info(
                "vae step %d/%d loss %.4f (%.0fs)",
                step,
                args.vae_steps,
                loss.item(),
                time.monotonic() - started,
            )
    vae.eval().requires_grad_(False)
    if args.resume:
        return vae
    with torch.no_grad():
        images, _ = dataset.training_batch(rng, 256)
        latents = vae.encode(torch.from_numpy(images)).latent_dist.mean
    # Unit-variance latents, as the scheduler's noise assumes.
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def train_denoiser(
    args: argparse.Namespace, rng: np.random.Generator, vae: Any, tokenizer: Any
) -> tuple[Any, Any, list[float]]:
    """Stage 2: UNet and text encoder together on v-prediction; returns their EMA copies."""
    import copy

    import torch
    from diffusers import DDPMScheduler

    if args.resume:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel.from_pretrained(args.resume / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(args.resume / "unet")
    else:
        text_encoder = model.build_text_encoder(
            len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, args.text_layers
        )
        unet = model.build_unet(args.pooled_prompt)
    unet.train()
    text_encoder.train()
    noise_schedule = DDPMScheduler.from_config(model.build_scheduler().config)
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    # fused: one kernel updates every parameter, instead of a dozen small ops per parameter tensor.
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01, fused=True)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_parameters = [*ema_unet.parameters(), *ema_text.parameters()]
    torch_generator = torch.Generator().manual_seed(args.seed)
    scaling = vae.config.scaling_factor
    alphas = noise_schedule.alphas_cumprod
    signal_to_noise = alphas / (1 - alphas).clamp(min=1e-8)
    losses: list[float] = []
    started = time.monotonic()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        images, prompts = dataset.training_batch(rng, args.batch)
        with torch.no_grad():
            latents = vae.encode(torch.from_numpy(images)).latent_dist.mean * scaling
        tokens = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        noise = torch.randn(latents.shape, generator=torch_generator)
        timesteps = torch.randint(
            0, noise_schedule.config.num_train_timesteps, (args.batch,), generator=torch_generator
        )
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        target = noise_schedule.get_velocity(latents, noise, timesteps)
        context = text_encoder(tokens)[0]
        prediction = unet(noisy, timesteps, context).sample
        snr = signal_to_noise[timesteps]
        weights = torch.clamp((args.snr_gamma + 1) / (snr + 1), max=1.0)
        loss = ((prediction - target).pow(2).mean(dim=(1, 2, 3)) * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_parameters, parameters, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            recent = float(np.mean(losses[-50:]))
            log.info(
                "unet step %d/%d loss %.4f (%.0fs)", step, args.steps, recent, time.monotonic() - started
            )
    return ema_unet, ema_text, losses


def save(pipeline: Any, output: Path, record: dict[str, Any]) -> None:
    """Write the pipeline (safetensors) and training.json; the directory appears whole or not at all."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        defaults = {"num_inference_steps": model.DEFAULT_STEPS, "guidance_scale": model.DEFAULT_GUIDANCE}
        (staging / WORKER_DEFAULTS_FILE).write_text(json.dumps(defaults) + "\n")
        if output.exists():
            shutil.rmtree(output)
        staging.replace(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Train both stages, measure, save."""
    import diffusers
    import torch
    import transformers

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    previous = json.loads((args.resume / "training.json").read_text()) if args.resume else None
    started = time.monotonic()
    vae = train_autoencoder(args, rng)
    vae_seconds = time.monotonic() - started
    tokenizer = model.build_tokenizer()
    unet, text_encoder, losses = train_denoiser(args, rng, vae, tokenizer)
    train_seconds = time.monotonic() - started
    pipeline = model.assemble_pipeline(tokenizer, text_encoder, vae, unet, model.build_scheduler())
    pipeline.set_progress_bar_config(disable=True)
    metrics = None
    if args.eval_seeds:
        metrics = evaluate.measure_model(
            pipeline, args.eval_seeds, steps=model.DEFAULT_STEPS, guidance_scale=model.DEFAULT_GUIDANCE
        )
        log.info("metrics %s", metrics)
    record = {
        "command": "python -m diffusion_worker.shapes.train "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "arguments": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
        },
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "unet_steps": args.steps,
        "wall_seconds_vae": round(vae_seconds, 1),
        "wall_seconds_total_training": round(train_seconds, 1),
        "final_loss_mean_last_100": round(float(np.mean(losses[-100:])), 5),
        "metrics": metrics,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": args.threads,
        },
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
        "resumed_from": previous,
    }
    save(pipeline, args.output, record)
    log.info("wrote %s in %.0fs", args.output, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
