"""Images in and out of the pipelines: the autoencoder they decode with, conversions, grids.

Decoder outputs are about [-1, 1]; images handed to users are uint8 (PIL) or floats in [0, 1],
NHWC throughout.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from streamflow_jax.checkpoint import load
from streamflow_jax.errors import ConfigError, ConversionError, check_count, is_real_dtype

OUTPUT_TYPES = ("pil", "np", "latent")


def check_taesd(taesd) -> None:
    """A TAESD given to a pipeline's ``load`` is a model directory: refused before the pipeline's
    other components load (it is loaded last, after the velocity model and the text encoders)."""
    where = Path(taesd)
    if not where.is_dir():
        raise ConfigError(f"{taesd}: {'not a directory' if where.exists() else 'no such directory'} (a TAESD is a "
                          "diffusers AutoencoderTiny directory, e.g. madebyollin/taesd, or one sf.convert made)")
    if not (where / "config.json").is_file():
        raise ConfigError(f"{taesd}: no config.json: not a diffusers AutoencoderTiny directory")


def load_autoencoder(path: Path, taesd=None, *, for_model=None, **opts):
    """A pipeline's ``vae/``, or a TAESD directory given instead (``opts``: ``load``'s).

    Args:
        for_model: the pipeline's velocity model: the decoder must take its latents (a TAESD
            for another family is refused here, not by a convolution after sampling).
    """
    where = taesd or Path(path) / "vae"
    if taesd is not None:  # its own directory: the pipeline's weights variant and LoRAs are not its
        model = load(taesd, **{k: v for k, v in opts.items() if k not in ("variant", "loras")})
    else:
        model = load(path, component="vae", **opts)
    if model.family.kind != "autoencoder":
        raise ConversionError(f"{where}: {model.class_name} is not a VAE/TAESD")
    if for_model is not None and model.latent_channels != for_model.latent_channels:
        raise ConfigError(f"{where}: {model.class_name} takes {model.latent_channels}-channel latents, and this "
                          f"pipeline's {for_model.class_name} makes {for_model.latent_channels}-channel ones "
                          "(an autoencoder of another model family?)")
    return model


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type {output_type!r} not in {OUTPUT_TYPES}")


def to_float_images(images) -> np.ndarray:
    """Decoder output about [-1, 1] -> float32 images in [0, 1]."""
    return np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0, 1)


def to_uint8(images) -> np.ndarray:
    """Decoder output about [-1, 1] -> uint8 pixels (as diffusers' image processor rounds)."""
    return (to_float_images(images) * 255).round().astype(np.uint8)


def read_image(source: bytes | str | Path, what: str, max_pixels: int | None = None,
               formats: tuple[str, ...] | None = None) -> Image.Image:
    """An image decoded from a file or from bytes (any format Pillow reads, or one of
    ``formats``, Pillow's names), or a ValueError naming ``what``: missing, a directory, not an
    image, larger than ``max_pixels`` (checked from the header, before decoding), or a
    decompression bomb by Pillow's own limit. The CLI's ``--image`` and the server's uploads and
    frames both read images through it."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=formats)
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{what}: a directory, not an image file") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{what}: too large to decode ({e})") from None
    except UnidentifiedImageError:  # Pillow's message names a BytesIO object
        kinds = f" ({', '.join(formats)})" if formats else ""
        raise ValueError(f"{what}: not an image{kinds} Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{what}: not an image Pillow can read ({e})") from None
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ValueError(f"{what}: {image.width}x{image.height} is larger than {max_pixels} pixels")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{what}: not an image Pillow can read ({e})") from None
    return eight_bit(image, what)


def eight_bit(image: Image.Image, what: str = "image") -> Image.Image:
    """A grey image of more than 8 bits a pixel as 8-bit grey, scaled: Pillow's
    ``convert("RGB"/"L")`` clips them instead (a 16-bit PNG came out nearly all white, a float
    TIFF in [0, 1] black). 16-bit integers (``I;16``, or ``I`` within 16 bits) are divided by
    257; floats (``F``) must lie in [0, 1]; anything else is refused, naming ``what``. Other
    modes are returned as they are."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    arr = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"{what}: float pixels must lie in [0, 1], these span [{arr.min():g}, {arr.max():g}]")
        arr = arr * 255
    elif arr.min() < 0 or arr.max() > 65535:
        raise ValueError(f"{what}: {image.mode} pixels beyond 16 bits ([{arr.min():g}, {arr.max():g}]); save it as "
                         "an 8- or 16-bit image")
    else:
        arr = arr / 257
    return Image.fromarray(np.round(arr).astype(np.uint8), mode="L")


def image_grid(images: np.ndarray, rows: int, scale: int = 4, gap: int = 2) -> Image.Image:
    """``[rows*cols, h, w]`` images in [0, 1] -> one PIL image, tiles upscaled nearest-neighbour."""
    n, h, w = images.shape
    if n % check_count("rows", rows):
        raise ValueError(f"rows={rows!r}: {n} images do not fill equal rows")
    cols = n // rows
    tile_w, tile_h = w * scale, h * scale
    canvas = Image.new("L", (cols * (tile_w + gap) + gap, rows * (tile_h + gap) + gap), color=40)
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        tile = Image.fromarray(pixels[i], mode="L").resize((tile_w, tile_h), Image.Resampling.NEAREST)
        canvas.paste(tile, (gap + c * (tile_w + gap), gap + r * (tile_h + gap)))
    return canvas


def images_to_array(image, channels: int | None = 3) -> np.ndarray:
    """PIL image(s) or an array ``[B, H, W, C]`` / ``[H, W, C]`` (floats in [0, 1], or uint8)
    -> float32 ``[B, H, W, C]`` in [0, 1]. A path (or a list of them) is read as an image file."""
    if isinstance(image, str | Path | Image.Image):
        image = [image]
    if isinstance(image, list | tuple) and image and any(isinstance(im, str | Path | Image.Image) for im in image):
        if not all(isinstance(im, str | Path | Image.Image) for im in image):
            raise ValueError("image: a list must hold only PIL images or paths, or be one array")
        mode = "L" if channels == 1 else "RGB"
        image = [read_image(im, f"image {str(im)!r}") if isinstance(im, str | Path) else eight_bit(im) for im in image]
        sizes = sorted({im.size for im in image})
        if len(sizes) > 1:
            raise ValueError(f"image: the images have different sizes ({', '.join(f'{w}x{h}' for w, h in sizes)}); "
                             "give images of one size")
        image = np.stack([np.asarray(im.convert(mode)) for im in image])
    try:
        arr = np.asarray(image)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"image: not an array of one shape ({e})") from None
    if not is_real_dtype(arr.dtype):  # bfloat16 too
        raise ValueError(f"image: expected numbers (floats in [0, 1] or uint8), got an array of {arr.dtype}")
    if 0 in arr.shape:
        raise ValueError(f"image has shape {arr.shape}: an empty image")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255
    arr = arr.astype(np.float32)
    if channels == 1 and arr.ndim in (2, 3) and (arr.ndim == 2 or arr.shape[-1] != 1):
        arr = arr[..., None]  # [(B,) H, W] grey
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or (channels is not None and arr.shape[-1] != channels):
        raise ValueError(f"image has shape {arr.shape}; expected [B, H, W, {channels}] (or PIL images)")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise ValueError("image values must lie in [0, 1] (floats) or be uint8")
    return arr
