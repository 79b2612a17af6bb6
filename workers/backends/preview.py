"""Cheap in-progress previews: latents → RGB by a fixed linear projection, never a VAE decode.

A VAE decode per step would cost as much as a denoising step on big models; a 4x3 matrix multiply
on the latent grid costs nothing and is enough to watch composition and colour emerge.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Stable Diffusion 1.x/2.x latent channels → RGB, in the scaled latent space the pipelines iterate in
# (the widely used "latent RGB factors" fit, as in ComfyUI's latent_formats.SD15). Output is ~[-1, 1].
SD_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
SD_LATENT_RGB_BIAS: tuple[float, float, float] = (0.0, 0.0, 0.0)

PREVIEW_MAX_SIDE = 128
PREVIEW_JPEG_QUALITY = 60


def latents_to_rgb(latents: torch.Tensor) -> torch.Tensor:
    """One image's latents ``(C, H, W)`` → ``(H, W, 3)`` uint8 on the CPU."""
    import torch

    grid = latents.detach().float().permute(1, 2, 0)  # (H, W, C)
    channels = grid.shape[-1]
    if channels == len(SD_LATENT_RGB_FACTORS):
        factors = torch.tensor(SD_LATENT_RGB_FACTORS, device=grid.device)
        bias = torch.tensor(SD_LATENT_RGB_BIAS, device=grid.device)
        unit = ((grid @ factors + bias) + 1.0) / 2.0
    else:
        # Unknown latent space: show the first three channels, each stretched to [0, 1]. Not faithful
        # colour, but the layout of the image still shows through.
        picked = grid[..., :3] if channels >= 3 else grid[..., :1].expand(*grid.shape[:2], 3)
        low = picked.amin(dim=(0, 1), keepdim=True)
        high = picked.amax(dim=(0, 1), keepdim=True)
        unit = (picked - low) / (high - low).clamp_min(1e-6)
    return (unit.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu()


def preview_jpeg(
    latents: torch.Tensor, *, max_side: int = PREVIEW_MAX_SIDE, quality: int = PREVIEW_JPEG_QUALITY
) -> bytes | None:
    """A small JPEG of the first image in a ``(B, C, H, W)`` latent batch.

    Returns None for latents this projection cannot read (e.g. Flux's packed ``(B, tokens, C)``
    sequences), so a new model family degrades to progress without previews rather than failing.
    """
    from PIL import Image

    if latents.ndim != 4 or min(latents.shape) == 0:
        return None
    image = Image.fromarray(latents_to_rgb(latents[0]).numpy())
    # Latents are 1/8 of the image on real models, so this usually upscales: fine for a glance.
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
