"""Image denoising with NBNet: noise models, PSNR/SSIM, tiled inference, training.

>>> from spatial_attention.apps.denoise import load_default, add_noise, denoise_tiled
>>> model = load_default("gaussian")                         # the shipped blind denoiser
>>> noisy = add_noise(clean, "gaussian", sigma=25)          # clean: (B, 3, H, W) in [0, 1]
>>> out = denoise_tiled(model, noisy, tile=256, overlap=32)  # any size, bounded memory

One concern a module: :mod:`.noise`, :mod:`.metrics`, :mod:`.tiling`, :mod:`.train`
(clean images, patches, the training loop), :mod:`.default` (the weights shipped in the
package) and :mod:`.cli` (``spatial-attention denoise`` / ``train-denoiser``).
"""

from .cli import add_arguments, add_train_arguments, run, run_train
from .default import available_defaults, default_weights_path, load_default
from .metrics import psnr, ssim
from .noise import NOISE_MODELS, add_noise
from .tiling import denoise_tiled, tile_starts
from .train import (
    TEST_IMAGES,
    TRAIN_DEFAULTS,
    TRAIN_IMAGES,
    build_denoiser,
    denoiser_names,
    load_clean_images,
    sample_batch,
    train_denoiser,
)

__all__ = [
    "NOISE_MODELS",
    "TEST_IMAGES",
    "TRAIN_DEFAULTS",
    "TRAIN_IMAGES",
    "add_arguments",
    "add_noise",
    "add_train_arguments",
    "available_defaults",
    "build_denoiser",
    "default_weights_path",
    "denoise_tiled",
    "denoiser_names",
    "load_clean_images",
    "load_default",
    "psnr",
    "run",
    "run_train",
    "sample_batch",
    "ssim",
    "tile_starts",
    "train_denoiser",
]
