"""From encoded bytes to an H x W x 3 uint8 image, whatever a hand-collected folder holds.

The rules, the same on every path:
- EXIF orientation (tag 0x0112, values 1-8) is applied, so the image stands as it was shot.
- Grayscale is repeated into three channels.
- Transparency (alpha channels, palette or single-colour tRNS transparency) is composited onto
  WHITE: out = round(a * c + (1 - a) * 255) with a = alpha / alpha_max, because hand-collected
  cut-outs (product shots, icons, logos) are drawn to be seen on a white page.
- 16-bit samples are scaled, not truncated: out = round(v * 255 / 65535), so 65535 -> 255 and
  257 * k -> k.
- CMYK JPEGs are converted to RGB by Pillow (Adobe inverted CMYK included).
- GIF: the first frame.

Why two decoders. TensorFlow's decoders run inside the tf.data graph without the GIL, in parallel,
but cannot apply EXIF orientation, read CMYK JPEGs, GIF transparency or WebP. A single up-front
scan with Pillow (`probe_bytes`, run once per file before training) validates each file and
records a `kind` and the EXIF orientation; the pipeline then decodes:
- KIND_JPEG: 8-bit RGB or grayscale JPEG -> tf.io.decode_jpeg (the bulk of any photo folder);
- KIND_PNG: 8-bit RGB or grayscale PNG without transparency -> tf.io.decode_png;
- KIND_PNG_SCALED: PNGs without transparency that are palette, 1-4 or 16 bit -> tf.io.decode_png
  at 16 bits (libpng expands palettes and low bit depths to the full range), scaled in TF;
- KIND_PNG_ALPHA: PNGs with an alpha channel or a tRNS chunk -> tf.io.decode_png to 16-bit RGBA,
  composited and scaled in TF (not used for images without transparency: TF's decoder then fills
  the alpha with the source's bit-depth maximum, e.g. 3 for a 2-bit palette, not with opaque);
- KIND_PIL: everything else (CMYK JPEG, WebP, BMP, GIF, 1-4 bit gray PNG with tRNS, other
  formats Pillow reads) -> Pillow
  inside tf.numpy_function. This path holds the GIL for the Python glue (Pillow's decoders release
  it), so it is slower, which is acceptable for the few odd files of a typical folder; a folder made
  only of WebP still runs at several hundred small images per second (see jtl/data/throughput.py).
  A one-time conversion into a cache folder was the alternative; it was rejected because it
  doubles the disk footprint and re-encodes every odd file once per new folder, while numpy_function
  costs nothing when there are no odd files, which is the common case.
The orientation is applied in TF for every kind (phone photos are plain JPEGs with orientation 6
or 8, so they keep the fast decoder). Large JPEGs are decoded at a reduced scale (libjpeg's DCT
scaling by 1/2, 1/4 or 1/8, see `jpeg_downscale`): a 12-megapixel phone photo then costs ~40 ms
less to decode and, above all, ~100 ms less to resize, and the network never sees more than a
few hundred pixels of it anyway.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from jtl.data.tf_setup import tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

KIND_JPEG, KIND_PNG, KIND_PNG_SCALED, KIND_PNG_ALPHA, KIND_PIL = 0, 1, 2, 3, 4
KIND_NAMES = ("jpeg", "png", "png_scaled", "png_alpha", "pil")

# Pillow's own warning threshold (~ 9459 x 9459 pixels); larger images are refused as possible
# decompression bombs unless the caller raises the limit.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# Pixels a decoded JPEG keeps on its short side at least, by default: above 2 x 224 / 0.875.
DEFAULT_DECODE_MIN_SIDE = 512
JPEG_DOWNSCALES = (1, 2, 4, 8)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What the scan learned about one valid file."""
  kind: int
  orientation: int  # EXIF orientation 1-8 (1: as stored)
  height: int       # after orientation
  width: int


def _png_header(data: bytes) -> tuple[int, int] | None:
  """(bit depth, colour type) from the IHDR chunk, which the PNG format requires to come first."""
  if len(data) < 26 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
    return None
  return data[24], data[25]


def _png_kind(data: bytes) -> int:
  """Which decoder a PNG needs, from its IHDR and whether a tRNS chunk precedes the image data."""
  header = _png_header(data)
  if header is None:
    return KIND_PIL
  depth, colour_type = header
  idat = data.find(b"IDAT")
  has_trns = b"tRNS" in data[:idat if idat >= 0 else len(data)]
  if colour_type in (4, 6) or (has_trns and (colour_type == 3 or depth >= 8)):
    return KIND_PNG_ALPHA
  if has_trns:
    return KIND_PIL
  if depth == 8 and colour_type in (0, 2):
    return KIND_PNG
  return KIND_PNG_SCALED


def _orientation(img: Image.Image) -> int:
  try:
    value = int(img.getexif().get(_EXIF_ORIENTATION, 1))
  except Exception:  # pylint: disable=broad-except
    # A broken EXIF block says nothing about orientation; the pixels themselves may be fine.
    return 1
  return value if 1 <= value <= 8 else 1


def probe_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageInfo | str:
  """Validate one encoded image with Pillow: ImageInfo when usable, else the reason it is not.

  The pixel limit is checked from the header before anything is decoded. The image is then
  decoded in full (JPEGs at 1/8 scale with Pillow's draft mode, which still reads every entropy-
  coded byte, so truncation is caught at an eighth of the cost).
  """
  if not data:
    return "empty file (0 bytes)"
  try:
    img = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    return f"image too large (possible decompression bomb): {e}"
  except UnidentifiedImageError:
    return "not an image (format not recognised)"
  except Exception as e:  # pylint: disable=broad-except
    return f"unreadable image header: {type(e).__name__}: {e}"
  width, height = img.size
  if width * height > max_pixels:
    return (f"image too large (possible decompression bomb): {width}x{height} = "
            f"{width * height} pixels > limit {max_pixels}")
  if width == 0 or height == 0:
    return f"image has no pixels ({width}x{height})"
  mode, fmt = img.mode, img.format
  try:
    if fmt in ("JPEG", "MPO"):
      img.draft(mode, ((width + 7) // 8, (height + 7) // 8))
    img.load()
  except Exception as e:  # pylint: disable=broad-except
    return f"corrupt or truncated image data: {type(e).__name__}: {e}"
  orientation = _orientation(img)
  if fmt in ("JPEG", "MPO") and mode in ("RGB", "L"):
    kind = KIND_JPEG
  elif fmt == "PNG":
    kind = _png_kind(data)
  else:
    kind = KIND_PIL
  if orientation >= 5:
    height, width = width, height
  return ImageInfo(kind=kind, orientation=orientation, height=height, width=width)


def jpeg_downscale(height: int, width: int, min_side: int) -> int:
  """The largest libjpeg scale denominator that keeps the short side >= min_side (0: none)."""
  if min_side <= 0:
    return 1
  short = min(height, width)
  return max(r for r in JPEG_DOWNSCALES if -(-short // r) >= min_side or r == 1)


def jpeg_downscales(heights: np.ndarray, widths: np.ndarray, min_side: int) -> np.ndarray:
  """jpeg_downscale of every (height, width) at once (int32): opening a dataset of millions of
  images must not loop in Python."""
  short = np.minimum(np.asarray(heights, np.int64), np.asarray(widths, np.int64))
  scales = np.ones(short.shape, np.int32)
  if min_side <= 0:
    return scales
  for r in JPEG_DOWNSCALES[1:]:  # ascending: the largest that keeps the side wins
    scales[-(-short // r) >= min_side] = r
  return scales


def probe_file(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageInfo | str:
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return f"cannot read file: {e}"
  return probe_bytes(data, max_pixels)


def sniff_kind(data: bytes) -> int:
  """The decoder for bytes that need no validation (tfds records, written by TF's encoders)."""
  if data[:3] == b"\xff\xd8\xff":
    return KIND_JPEG
  return _png_kind(data)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray, alpha_max: float) -> np.ndarray:
  a = alpha.astype(np.float32)[..., None] / alpha_max
  out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
  """H x W x 3 uint8 from a Pillow image by the rules above, except orientation (applied in TF)."""
  mode = img.mode
  if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
    values = np.asarray(img).astype(np.float64)
    # Pillow's "I" and "F" modes come from 16-bit sources here; clip keeps odd 32-bit files sane.
    gray = np.round(np.clip(values, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  has_transparency = "transparency" in img.info or mode in ("RGBA", "LA", "PA", "La", "RGBa")
  if has_transparency:
    rgba = np.asarray(img.convert("RGBA"))
    return _composite_on_white(rgba[..., :3], rgba[..., 3], 255.0)
  if mode == "L":
    gray = np.asarray(img)
    return np.repeat(gray[..., None], 3, axis=-1)
  return np.asarray(img.convert("RGB"))


def decode_with_pil(data) -> np.ndarray:
  if isinstance(data, np.ndarray):  # what tf.numpy_function hands over for a string scalar
    data = data.item()
  with Image.open(io.BytesIO(data)) as img:
    return np.ascontiguousarray(pil_to_rgb(img))


def _decode_png_scaled(data: tf.Tensor) -> tf.Tensor:
  rgb = tf.cast(tf.io.decode_png(data, channels=3, dtype=tf.uint16), tf.float32)
  return tf.cast(tf.clip_by_value(tf.round(rgb * (255.0 / 65535.0)), 0.0, 255.0), tf.uint8)


def _decode_png_alpha(data: tf.Tensor) -> tf.Tensor:
  rgba = tf.cast(tf.io.decode_png(data, channels=4, dtype=tf.uint16), tf.float32)
  a = rgba[..., 3:] / 65535.0
  out = rgba[..., :3] * (255.0 / 65535.0) * a + 255.0 * (1.0 - a)
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def _decode_pil(data: tf.Tensor) -> tf.Tensor:
  image = tf.numpy_function(decode_with_pil, [data], tf.uint8, stateful=False)
  image.set_shape([None, None, 3])
  return image


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
  """Undo EXIF orientation 1-8 (the same transposes as PIL.ImageOps.exif_transpose)."""
  def transpose():
    return tf.transpose(image, [1, 0, 2])
  # 6 and 8 are tf.image.rot90's own ops (k=3, k=1) without its rank Assert, whose control edge
  # makes Grappler log a warning whenever this runs inside a tf.function (load_eval_image).
  branches = [
      lambda: image,
      lambda: tf.reverse(image, [1]),             # 2: mirrored left-right
      lambda: tf.reverse(image, [0, 1]),          # 3: upside down
      lambda: tf.reverse(image, [0]),             # 4: mirrored top-bottom
      transpose,                                  # 5
      lambda: tf.reverse(transpose(), [1]),       # 6: stored 90 degrees anticlockwise
      lambda: tf.reverse(transpose(), [0, 1]),    # 7
      lambda: tf.transpose(tf.reverse(image, [1]), [1, 0, 2]),  # 8: stored 90 degrees clockwise
  ]
  index = tf.clip_by_value(tf.cast(orientation, tf.int32) - 1, 0, 7)
  return tf.switch_case(index, branches)


def _decode_jpeg(data: tf.Tensor, downscale: tf.Tensor) -> tf.Tensor:
  # ratio must be a constant of the op: one branch per scale.
  def at(ratio):
    return lambda: tf.io.decode_jpeg(data, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")
  branch_of = tf.constant([0, 0, 1, 1, 2, 2, 2, 2, 3], tf.int32)  # downscale 1, 2, 4, 8 -> 0-3
  index = tf.gather(branch_of, tf.clip_by_value(tf.cast(downscale, tf.int32), 0, 8))
  return tf.switch_case(index, [at(r) for r in JPEG_DOWNSCALES])


def decode_tf(data: tf.Tensor, kind: tf.Tensor, orientation: tf.Tensor,
              downscale: tf.Tensor | int = 1, *, with_pil: bool = True) -> tf.Tensor:
  """Encoded bytes (scalar tf.string) -> uint8 [H, W, 3], by the kind the scan recorded; JPEGs
  at 1 / downscale of their size (1, 2, 4 or 8; rounded up like libjpeg). with_pil=False leaves
  out the Pillow branch, for graphs that are saved (a numpy_function cannot be serialised, and
  TF Serving has no PyFunc op); KIND_PIL then fails in tf.io.decode_png."""
  image = tf.switch_case(tf.cast(kind, tf.int32), [
      lambda: _decode_jpeg(data, downscale),
      lambda: tf.io.decode_png(data, channels=3),
      lambda: _decode_png_scaled(data),
      lambda: _decode_png_alpha(data),
      (lambda: _decode_pil(data)) if with_pil else (lambda: tf.io.decode_png(data, channels=3)),
  ])
  image = apply_orientation(image, orientation)
  image.set_shape([None, None, 3])
  return image
