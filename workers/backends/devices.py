"""Where a pipeline runs and in which precision, and how to recover memory after a failure."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda", "cuda:1", "mps" or "cpu"
    dtype: torch.dtype

    @property
    def kind(self) -> str:
        return self.device.split(":", 1)[0]


def choose_placement(device: str | None = None, dtype: str | None = None) -> Placement:
    """The best available accelerator unless ``device``/``dtype`` say otherwise.

    CUDA gets bfloat16 where the card supports it (no fp16 overflow to black images), else float16;
    Apple MPS gets float16; the CPU float32, since half precision there is slow or unsupported.
    """
    import torch

    chosen = device or _best_device()
    kind = chosen.split(":", 1)[0]
    if kind not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unknown device {chosen!r}: expected cuda, cuda:<n>, mps or cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {chosen!r} requested but torch sees no CUDA device")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but torch sees no Apple MPS device")
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
        return Placement(chosen, getattr(torch, dtype))
    return Placement(chosen, _best_dtype(kind))


def _best_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _best_dtype(kind: str) -> torch.dtype:
    import torch

    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.float32


def apply_memory_options(pipeline: Any, placement: Placement) -> None:
    """Memory savers that do not change the output.

    VAE slicing decodes a batch one image at a time: same pixels, lower peak on accelerators.
    Attention slicing only on MPS, where diffusers recommends it; on CUDA PyTorch's fused attention
    is already memory-efficient and slicing would only slow it down.
    """
    if placement.kind == "cpu":
        return
    vae = getattr(pipeline, "vae", None)
    if vae is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    if placement.kind == "mps" and hasattr(pipeline, "enable_attention_slicing"):
        pipeline.enable_attention_slicing()


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    # MPS and older CUDA builds raise a plain RuntimeError ("... out of memory ...").
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_cached_memory(placement: Placement) -> None:
    """Hand freed blocks back to the allocator so the next job starts from a clean slate."""
    import torch

    gc.collect()
    if placement.kind == "cuda":
        torch.cuda.empty_cache()
    elif placement.kind == "mps":
        torch.mps.empty_cache()


def default_cache_budget_bytes(placement: Placement) -> int:
    """Memory the model cache may fill when no budget is configured.

    CUDA: the card's memory less 20 % for activations, which grow with image size and batch.
    MPS: Metal's recommended working set, halved (it is shared with the system).
    CPU: half the machine's RAM.
    """
    import os

    import torch

    if placement.kind == "cuda":
        index = torch.device(placement.device).index or 0
        return int(torch.cuda.get_device_properties(index).total_memory * 0.8)
    if placement.kind == "mps":
        return int(torch.mps.recommended_max_memory() * 0.5)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
