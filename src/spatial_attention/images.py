"""Images to look at: the built-in sample images and a tolerant image loader.

>>> from spatial_attention.images import builtin_images, load_image
>>> builtin_images()                         # what this machine has on disk
['astronaut', 'camera', 'chelsea', 'coffee', ...]
>>> load_image("builtin:astronaut", size=224).shape   # short side resized to 224
(224, 224, 3)

Built-in images are files that ship *inside* installed packages (scikit-image's
``skimage/data`` and matplotlib's sample data); they are read from disk, so nothing is
ever downloaded. Which ones exist depends on what is installed; :func:`builtin_images`
lists them. Every image comes back as ``(H, W, 3)`` ``uint8`` RGB, whatever the file
held (grey, palette, alpha, 16-bit, CMYK): one shape for the overlays to rely on.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from .errors import UsageError

__all__ = ["BUILTIN_PREFIX", "builtin_images", "builtin_path", "load_image", "resize_short_side"]

BUILTIN_PREFIX = "builtin:"

# name -> (package that ships the file, path inside that package)
_BUILTINS: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "camera": ("skimage", "data/camera.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "retina": ("skimage", "data/retina.jpg"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    # more natural content for the denoisers' training and held-out sets
    "brick": ("skimage", "data/brick.png"),
    "coins": ("skimage", "data/coins.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "ihc": ("skimage", "data/ihc.png"),
    "moon": ("skimage", "data/moon.png"),
    "page": ("skimage", "data/page.png"),
}


def _package_dir(package: str) -> Path | None:
    # find_spec locates the package without importing it (importing skimage is slow,
    # and nothing here needs its code, only its files).
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_path(name: str) -> Path:
    """The file behind built-in image ``name``; a UsageError lists those available."""
    entry = _BUILTINS.get(name)
    if entry is not None:
        root = _package_dir(entry[0])
        if root is not None and (root / entry[1]).is_file():
            return root / entry[1]
    available = builtin_images()
    if entry is not None:
        raise UsageError(
            f"built-in image {name!r} needs the package {entry[0]!r}, which is not installed "
            f"(available here: {', '.join(available) or 'none'})"
        )
    raise UsageError(
        f"unknown built-in image {name!r}; available: {', '.join(available) or 'none'} "
        "(install scikit-image or matplotlib for more)"
    )


def builtin_images() -> list[str]:
    """Sorted names of the built-in images whose files exist on this machine."""
    names = []
    for name, (package, rel) in _BUILTINS.items():
        root = _package_dir(package)
        if root is not None and (root / rel).is_file():
            names.append(name)
    return sorted(names)


def _to_uint8_rgb(arr: np.ndarray, source: str) -> np.ndarray:
    """Any decoded image array -> ``(H, W, 3)`` uint8 RGB (alpha composited on white)."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (2, 3, 4)):
        raise UsageError(f"{source}: not a 2-D image (decoded to shape {arr.shape})")
    if arr.size == 0:
        raise UsageError(f"{source}: the image is empty (shape {arr.shape})")

    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 255.0
    elif arr.dtype == bool:
        x = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float32)
        if np.nanmax(x) > 1.0:  # a float image stored in 0..255
            x = x / 255.0
        x = np.nan_to_num(x)
    elif np.issubdtype(arr.dtype, np.integer):
        # 16-bit files use 0..65535; PIL's 32-bit "I" mode holds them too, so scale by
        # the dtype's range when it is in use and by the data's maximum otherwise.
        top = float(arr.max())
        rng = 65535.0 if arr.dtype == np.uint16 or top > 255 else 255.0
        x = arr.astype(np.float32) / rng
    else:
        raise UsageError(f"{source}: unsupported pixel type {arr.dtype}")
    x = np.clip(x, 0.0, 1.0)

    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    elif x.shape[-1] == 2:  # grey + alpha
        x = np.concatenate([np.repeat(x[..., :1], 3, axis=-1), x[..., 1:]], axis=-1)
    if x.shape[-1] == 4:
        alpha = x[..., 3:]
        x = x[..., :3] * alpha + (1.0 - alpha)
    return np.ascontiguousarray(np.round(x * 255.0).astype(np.uint8))


def _read_with_pil(path: Path, source: str) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()  # decode now, so a truncated file fails here and not later
        img = ImageOps.exif_transpose(img)  # photos from phones carry their rotation in EXIF
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode == "1":
            img = img.convert("L")
        elif img.mode.startswith("I;16"):
            img = img.convert("I")
        elif img.mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):
            img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
        return np.array(img)


def _read_with_matplotlib(path: Path, source: str) -> np.ndarray:
    try:
        import matplotlib.image as mpimg
    except ImportError:
        raise UsageError(
            f"{source}: reading images needs Pillow or matplotlib "
            "(pip install spatial-attention[viz])"
        ) from None
    return mpimg.imread(str(path))


def _read(path: Path, source: str) -> np.ndarray:
    try:
        import PIL  # noqa: F401

        reader = _read_with_pil
    except ImportError:
        reader = _read_with_matplotlib
    try:
        arr = reader(path, source)
    except UsageError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{source}: cannot read it as an image ({detail})") from None
    return _to_uint8_rgb(arr, source)


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(H, W, 3)`` uint8 so its shorter side is ``size``, keeping the aspect ratio.

    Bilinear with antialiasing (torch), so shrinking a photo does not alias.
    """
    import torch
    import torch.nn.functional as F

    size = _check_size(size)
    H, W = image.shape[:2]
    if min(H, W) == size:
        return image
    scale = size / min(H, W)
    out_hw = (max(1, round(H * scale)), max(1, round(W * scale)))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise UsageError(f"image size must be a positive integer, got {size!r}")
    return int(size)


def load_image(spec: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` uint8 RGB.

    Args:
        spec: a file path, or ``"builtin:NAME"`` for one of :func:`builtin_images`.
        size: when given, resize so the *shorter* side is ``size`` pixels (aspect kept).

    Raises:
        UsageError: a missing file, an unknown built-in name (the message lists the
            available ones), a file that is not a readable image, or a bad ``size``.
    """
    if size is not None:
        size = _check_size(size)
    text = os.fspath(spec)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX):]
        path, source = builtin_path(name), f"built-in image {name!r}"
    else:
        path, source = Path(text).expanduser(), text
        if not path.exists():
            raise UsageError(f"image file not found: {text}")
        if not path.is_file():
            raise UsageError(f"not an image file: {text} (is it a directory?)")
    image = _read(path, source)
    return image if size is None else resize_short_side(image, size)
