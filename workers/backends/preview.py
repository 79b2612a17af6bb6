"""Cheap in-progress previews: latents → RGB by a fixed linear projection, never a VAE decode.

A VAE decode per step would cost as much as a denoising step on big models; a (C x 3) matrix multiply
on the latent grid costs nothing and is enough to watch composition and colour emerge.

The factors are the widely used "latent RGB factors" fits (as in ComfyUI's ``latent_formats``), for the
scaled latent space the diffusers pipelines iterate in. Output is roughly [-1, 1].
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from schemas.catalog import ModelFamily

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class LatentRgbProjection:
    """One latent space's linear map to RGB: one row of factors per latent channel, plus a bias."""

    factors: tuple[RGB, ...]
    bias: RGB = (0.0, 0.0, 0.0)

    @property
    def channels(self) -> int:
        return len(self.factors)


# Stable Diffusion 1.x/2.x (ComfyUI's SD15).
SD_PROJECTION = LatentRgbProjection(
    factors=(
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
)
# SDXL and its fine-tunes (Illustrious, SDXL-turbo): ComfyUI's SDXL.
SDXL_PROJECTION = LatentRgbProjection(
    factors=(
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    bias=(0.1084, -0.0175, -0.0011),
)
# Stable Diffusion 3.x's 16-channel VAE: ComfyUI's SD3.
SD3_PROJECTION = LatentRgbProjection(
    factors=(
        (-0.0922, -0.0175, 0.0749),
        (0.0311, 0.0633, 0.0954),
        (0.1994, 0.0927, 0.0458),
        (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496),
        (-0.0006, 0.1104, 0.0309),
        (0.0978, 0.0306, 0.0427),
        (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669),
        (-0.0488, 0.0130, -0.0268),
        (0.0922, 0.0988, 0.0951),
        (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895),
        (-0.0069, -0.0030, -0.0810),
        (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189),
    ),
    bias=(0.2394, 0.2135, 0.1925),
)
# FLUX.1's 16-channel VAE (also Chroma's): ComfyUI's Flux.
FLUX_PROJECTION = LatentRgbProjection(
    factors=(
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ),
    bias=(-0.0329, -0.0718, -0.0851),
)
# "other" has none: it gets the generic first-three-channels view.
PROJECTIONS: dict[str, LatentRgbProjection] = {
    "sd": SD_PROJECTION,
    "sdxl": SDXL_PROJECTION,
    "sd3": SD3_PROJECTION,
    "flux": FLUX_PROJECTION,
}

# Kept for callers that predate the per-family table.
SD_LATENT_RGB_FACTORS = SD_PROJECTION.factors
SD_LATENT_RGB_BIAS = SD_PROJECTION.bias

# FLUX.1's VAE downscales 8x and the pipeline packs 2x2 latent patches into one token.
FLUX_VAE_SCALE = 8
FLUX_PATCH = 2

PREVIEW_MAX_SIDE = 128
PREVIEW_JPEG_QUALITY = 60


def unpack_flux_latents(latents: torch.Tensor, *, width: int, height: int) -> torch.Tensor | None:
    """Packed ``(B, tokens, C * 4)`` Flux latents → ``(B, C, H/8, W/8)``, as FluxPipeline._unpack_latents.

    None when the tensor does not hold the token grid that ``width`` x ``height`` makes.
    """
    if latents.ndim != 3:
        return None
    batch, tokens, packed_channels = latents.shape
    # The pipeline rounds the image size down to whole 2x2 latent patches the same way.
    rows = height // (FLUX_VAE_SCALE * FLUX_PATCH)
    columns = width // (FLUX_VAE_SCALE * FLUX_PATCH)
    patch_area = FLUX_PATCH * FLUX_PATCH
    if rows * columns != tokens or tokens == 0 or packed_channels % patch_area or packed_channels == 0:
        return None
    channels = packed_channels // patch_area
    grid = latents.reshape(batch, rows, columns, channels, FLUX_PATCH, FLUX_PATCH)
    grid = grid.permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(batch, channels, rows * FLUX_PATCH, columns * FLUX_PATCH)


def latents_to_rgb(latents: torch.Tensor, family: ModelFamily = "sd") -> torch.Tensor:
    """One image's latents ``(C, H, W)`` → ``(H, W, 3)`` uint8 on the CPU.

    The family's projection when the channel count is the one it expects; otherwise (and for "other")
    the first three channels, each stretched to [0, 1]: not faithful colour, but the layout shows through.
    """
    import torch

    grid = latents.detach().float().permute(1, 2, 0)  # (H, W, C)
    channels = grid.shape[-1]
    projection = PROJECTIONS.get(family)
    if projection is not None and projection.channels == channels:
        factors = torch.tensor(projection.factors, device=grid.device)
        bias = torch.tensor(projection.bias, device=grid.device)
        unit = ((grid @ factors + bias) + 1.0) / 2.0
    else:
        picked = grid[..., :3] if channels >= 3 else grid[..., :1].expand(*grid.shape[:2], 3)
        low = picked.amin(dim=(0, 1), keepdim=True)
        high = picked.amax(dim=(0, 1), keepdim=True)
        unit = (picked - low) / (high - low).clamp_min(1e-6)
    return (unit.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu()


def _latent_grid(
    latents: torch.Tensor, family: ModelFamily, width: int | None, height: int | None
) -> torch.Tensor | None:
    """The ``(B, C, H, W)`` batch to draw from, or None when the shape cannot be read as one."""
    if latents.ndim == 3 and family == "flux" and width is not None and height is not None:
        return unpack_flux_latents(latents, width=width, height=height)
    if latents.ndim == 4:
        return latents
    return None


def preview_jpeg(
    latents: torch.Tensor,
    *,
    family: ModelFamily = "sd",
    width: int | None = None,
    height: int | None = None,
    index: int = 0,
    max_side: int = PREVIEW_MAX_SIDE,
    quality: int = PREVIEW_JPEG_QUALITY,
) -> bytes | None:
    """A small JPEG of batch member ``index`` of the latents a pipeline is iterating on.

    ``latents`` is ``(B, C, H, W)``, or for ``family="flux"`` the packed ``(B, tokens, C * 4)``
    sequence FluxPipeline iterates on, which needs ``width`` and ``height`` (the requested image size)
    to unpack. The JPEG's longer side is ``max_side`` and its aspect is ``width:height`` when given,
    else the latent grid's. Returns None for latents it cannot read (an unknown layout, a packed
    sequence without the size, a missing batch member), so a new model family degrades to progress
    without previews rather than failing the job.
    """
    from PIL import Image

    grid = _latent_grid(latents, family, width, height)
    if grid is None or min(grid.shape) == 0 or not 0 <= index < grid.shape[0]:
        return None
    image = Image.fromarray(latents_to_rgb(grid[index], family).numpy())
    aspect_width, aspect_height = (width, height) if width and height else image.size
    # Latents are 1/8 of the image on real models, so this usually upscales: fine for a glance.
    scale = max_side / max(aspect_width, aspect_height)
    size = (max(1, round(aspect_width * scale)), max(1, round(aspect_height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
