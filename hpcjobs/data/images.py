"""Image decoding and the deployment preprocessing, shared by prepare and infer.

The same function turns any image into what the model was trained on: 16-bit to
8-bit, grayscale/RGBA to the model's channels, pad to square when the aspect ratio
differs, area interpolation when shrinking and cubic when enlarging.
"""
from __future__ import annotations

import contextlib
import io
import math
import os

import numpy as np

from ..errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
MAX_FILE_BYTES = 256 << 20  # an image file larger than this is refused unread
REDUCE_ABOVE = 4096 * 4096  # pixels: a larger image is box-reduced right after decoding


class ImageError(UserError, ValueError):
    """An image file that cannot be used: names the file and the reason."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # crosses from a prepare worker process to the parent
        return type(self), (self.path, self.reason)


# The image path: how a raw image becomes the model's input.  A store records the path
# that made it (its card says so) and an export records the one its model was trained
# with, so infer and evaluate preprocess as training did.
IMAGE_PATH = "pil-draft/1"  # JPEG draft decoding at >= 2x the target size, Pillow's resize
LEGACY_PATH = "tf/1"  # full decode, tf.image.resize: stores and exports made before the path was recorded
IMAGE_PATHS = {
    IMAGE_PATH: "Pillow decode (JPEG draft decoding at no less than twice the target size), "
                "box (area) filter when shrinking, bicubic when enlarging",
    LEGACY_PATH: "full decode, tf.image.resize: area when shrinking, bicubic when enlarging",
}


def _read(path: str) -> bytes:
    from ..rundir import FileRefused, read_capped

    try:
        data = read_capped(path, MAX_FILE_BYTES, "image")
    except OSError as e:
        raise ImageError(path, f"cannot read ({e.strerror or e})") from None
    except FileRefused as e:
        raise ImageError(path, str(e).removeprefix(f"{path}: ")) from None
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    return data


def _decode_bytes(im) -> np.ndarray:
    """A loaded PIL image as an array; one over REDUCE_ABOVE pixels box-reduced first."""
    w, h = im.size
    if w * h > REDUCE_ABOVE:
        factor = math.ceil(math.sqrt(w * h / REDUCE_ABOVE))
        with contextlib.suppress(ValueError):  # a mode reduce() does not take stays as it is
            im = im.reduce(factor)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(im, dtype=np.uint16)
    elif im.mode == "I":
        return np.asarray(im, dtype=np.int32)
    elif im.mode not in ("L", "RGB", "RGBA", "LA"):
        im = im.convert("RGB")
    return np.asarray(im)


def _draft(im, target: tuple[int, int] | None):
    """JPEG draft decoding (libjpeg's DCT-domain downscale by 2, 4 or 8), only as far as
    the image stays at no less than twice ``target`` (height, width) after padding to its
    aspect: the largest scale k with max(h/k/H, w/k/W) >= 2."""
    if target is None or im.format != "JPEG":
        return
    w, h = im.size
    shrink = max(h / target[0], w / target[1])
    k = 1
    while k < 8 and shrink / (2 * k) >= 2:
        k *= 2
    if k > 1:
        im.draft(im.mode, (-(-w // k), -(-h // k)))


def decode(path: str, draft: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file into an array (H, W) or (H, W, C), keeping its bit depth.

    A file that is no regular file or is over MAX_FILE_BYTES is refused unread; a
    full-size decode waits for its share of the memory (``limits.PIXELS``: decode
    threads take turns, one image that alone would not fit is refused); an image over
    REDUCE_ABOVE pixels is box-reduced by an integer factor at once, so what follows
    (channels, padding, resizing) stays small.  Prepare and infer both decode here."""
    from PIL import Image, UnidentifiedImageError

    from .limits import PIXELS

    data = _read(path)
    try:
        with Image.open(io.BytesIO(data)) as im:
            _draft(im, draft)
            w, h = im.size
            nbytes = w * h * (16 if im.mode.startswith(("I", "F")) else 8)  # PIL's own buffer, then a copy
            PIXELS.acquire(nbytes, path, ImageError)
            try:
                im.load()
                return _decode_bytes(im)
            finally:
                PIXELS.release(nbytes)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:  # an Exception, not an OSError: a header claiming too many pixels
        raise ImageError(path, f"refused as a decompression bomb ({str(e).split(', could')[0]})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(path, f"corrupt or truncated image ({e})") from None
    except Exception as e:  # noqa: BLE001  hostile bytes make PIL raise all sorts; an image error all the same
        raise ImageError(path, f"cannot decode ({type(e).__name__}: {str(e)[:200]})") from None


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Bring any bit depth to uint8: 16-bit and int images are scaled, floats in [0,1] too."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.bool_:
        return img.astype(np.uint8) * 255
    if img.dtype in (np.uint16, np.int32, np.int64, np.uint32):
        top = 65535 if img.dtype == np.uint16 or img.max(initial=0) > 255 else 255
        return np.clip(np.round(img.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        scale = 255.0 if img.max(initial=0) <= 1.0 else 1.0
        return np.clip(np.round(img * scale), 0, 255).astype(np.uint8)
    return np.clip(img, 0, 255).astype(np.uint8)


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, channels) from grayscale, gray+alpha, RGB or RGBA (alpha over white)."""
    if img.ndim == 2:
        img = img[:, :, None]
    c = img.shape[2]
    if c in (2, 4):  # composite the alpha channel onto white
        alpha = img[:, :, -1:].astype(np.float32) / 255.0
        img = np.round(img[:, :, :-1] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
        c -= 1
    if c == channels:
        return img
    if channels == 1:  # ITU-R 601 luma
        gray = img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114
        return np.round(gray).astype(np.uint8)[:, :, None]
    return np.repeat(img, 3, axis=2)


def pad_to_aspect(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad (centred, edge colour) so the image has the target aspect ratio."""
    h, w = img.shape[:2]
    if h * width == w * height:
        return img
    if w * height > h * width:  # too wide: add rows
        new_h, new_w = int(round(w * height / width)), w
    else:
        new_h, new_w = h, int(round(h * width / height))
    top, left = (new_h - h) // 2, (new_w - w) // 2
    pad = ((top, new_h - h - top), (left, new_w - w - left), (0, 0))
    return np.pad(img, pad, mode="edge")


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area interpolation when shrinking, bicubic when enlarging."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    import tensorflow as tf

    method = "area" if height * width < h * w else "bicubic"
    out = tf.image.resize(img[None].astype(np.float32), (height, width), method=method)[0].numpy()
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def resize_pil(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow's box filter (area averaging) when shrinking, bicubic when enlarging."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    from PIL import Image

    method = Image.Resampling.BOX if height * width < h * w else Image.Resampling.BICUBIC
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(img[:, :, 0]), "L").resize((width, height), method))] \
        if img.shape[2] == 1 else None
    if planes is None:
        return np.asarray(Image.fromarray(np.ascontiguousarray(img), "RGB").resize((width, height), method))
    return planes[0][:, :, None]


def to_model_image(img: np.ndarray, size: tuple[int, int] | None, channels: int,
                   path: str = IMAGE_PATH) -> np.ndarray:
    """The deployment preprocessing: uint8 (H, W, channels) at the model's input size,
    by the image path ``path`` (IMAGE_PATH, or LEGACY_PATH for what was made before)."""
    img = to_channels(to_uint8(np.asarray(img)), channels)
    if size is not None:
        img = pad_to_aspect(img, *size)
        img = resize(img, *size) if path == LEGACY_PATH else resize_pil(img, *size)
    return img


def model_image(item, size: tuple[int, int] | None, channels: int, path: str = IMAGE_PATH) -> np.ndarray:
    """The one function from a raw image to the model's input, for training and serving:
    ``item`` is an image file (decoded here, with draft decoding on IMAGE_PATH) or an
    array already decoded."""
    if path not in IMAGE_PATHS:
        raise UserError(f"image path {path!r} is unknown to this hpcjobs (known: {', '.join(IMAGE_PATHS)})")
    if isinstance(item, (str, bytes, os.PathLike)):
        item = decode(item, draft=size if path == IMAGE_PATH else None)
    return to_model_image(item, size, channels, path)


def native_channels(img: np.ndarray) -> int:
    """Channels a model would naturally use for this image: 1 for gray, else 3."""
    return 1 if img.ndim == 2 or img.shape[2] in (1, 2) else 3
