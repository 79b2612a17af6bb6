"""LoRA files for the tiny builtin pipelines, written the way trainers save them.

A LoRA here is what `peft` trains on the pipeline's denoiser (UNet or Flux transformer), saved with the
pipeline class's own ``save_lora_weights``: exactly the ``.safetensors`` layout that
``load_lora_weights`` reads, so the worker's LoRA handling is tested against the real format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from workers.backends.tiny import BUILTINS

# The attention projections community LoRAs target.
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
# How much lora_B is multiplied by, per pipeline, so weight 1.0 moves a 64x64, 4-step image by a few
# percent of the pixel range on average (measured): Flux's single double-stream block needs far more.
DEFAULT_SCALES = {"tiny-sd": 2.0, "tiny-sdxl": 2.0, "tiny-flux": 16.0}


def _denoiser_name(pipeline: Any) -> str:
    return "transformer" if getattr(pipeline, "transformer", None) is not None else "unet"


def write_tiny_lora(
    pipeline_name: str, path: Path, *, rank: int = 4, seed: int = 0, scale: float | None = None
) -> Path:
    """Write a seeded random LoRA for builtin ``pipeline_name``'s denoiser to ``path`` (a .safetensors file).

    ``scale`` multiplies lora_B (None: the pipeline's DEFAULT_SCALES entry). The same arguments
    always write the same weights.
    """
    if path.suffix != ".safetensors":
        raise ValueError(f"a LoRA file is a .safetensors file, not {path.name!r}")
    # Any: each pipeline class has its own save_lora_weights, which DiffusionPipeline does not declare.
    pipeline: Any = BUILTINS[pipeline_name]()
    denoiser_name = _denoiser_name(pipeline)
    denoiser = getattr(pipeline, denoiser_name)
    # lora_alpha == rank: the file needs no alpha metadata, loaders read an effective scale of 1.
    # init_lora_weights=False: peft's default zero lora_B would make a LoRA that changes nothing.
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGET_MODULES, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser.add_adapter(config)
    strength = DEFAULT_SCALES[pipeline_name] if scale is None else scale
    layers = {
        key: tensor * strength if ".lora_B." in key else tensor
        for key, tensor in get_peft_model_state_dict(denoiser).items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    type(pipeline).save_lora_weights(path.parent, **{f"{denoiser_name}_lora_layers": layers}, weight_name=path.name)
    return path
