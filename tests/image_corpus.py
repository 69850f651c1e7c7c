"""Writers of the odd and the bad image files a hand-collected folder holds, generated with PIL
(nothing binary is checked in), each with what a correct loader must make of it.

  write_odd_images(dir)  -> [OddImage]: valid files with the exact (or, for lossy JPEGs,
                            approximate) H x W x 3 uint8 they must decode to under jtl's rules
                            (EXIF orientation applied, alpha over white, 16 bit scaled by 255/65535)
  write_bad_images(dir)  -> {file name: words its rejection reason must contain}
  write_png(...)         a minimal PNG writer for what PIL cannot save (16-bit RGB/RGBA, tRNS,
                            huge declared sizes)
"""
from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class OddImage:
  name: str               # file name inside the directory
  expected: np.ndarray    # H x W x 3 uint8
  tolerance: int = 0      # max abs difference allowed (lossy formats)


def upright(height: int = 6, width: int = 8) -> np.ndarray:
  """An asymmetric RGB test card: every transpose or flip of it is different."""
  img = np.zeros((height, width, 3), np.uint8)
  img[: height // 2, : width // 2] = (230, 20, 20)       # top-left red
  img[: height // 2, width // 2:] = (20, 200, 30)        # top-right green
  img[height // 2:, : width // 2] = (30, 40, 220)        # bottom-left blue
  img[height // 2:, width // 2:] = (240, 230, 40)        # bottom-right yellow
  img[0, 0] = (255, 255, 255)                            # one marked corner
  return img


# For each EXIF orientation, the Pillow transpose that turns the upright card into the stored
# pixels (the inverse of what exif_transpose applies).
_STORE_AS = {
    1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def stored_for_orientation(card: np.ndarray, orientation: int) -> Image.Image:
  img = Image.fromarray(card)
  method = _STORE_AS[orientation]
  return img if method is None else img.transpose(method)


def exif_bytes(orientation: int) -> bytes:
  exif = Image.Exif()
  exif[0x0112] = orientation
  return exif.tobytes()


def _chunk(kind: bytes, payload: bytes) -> bytes:
  return (struct.pack(">I", len(payload)) + kind + payload
          + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def write_png(path: str, pixels: np.ndarray | None, *, bit_depth: int, color_type: int,
              size: tuple[int, int] | None = None, trns: bytes | None = None) -> None:
  """Write a PNG by hand. pixels: H x W x C (uint8 or uint16, written big-endian); with pixels
  None, an all-zero image of size (width, height) is streamed (for huge declared sizes)."""
  if pixels is not None:
    height, width = pixels.shape[:2]
  else:
    width, height = size
  header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
  compressor = zlib.compressobj(9)
  parts = []
  if pixels is not None:
    dtype = ">u2" if bit_depth == 16 else np.uint8
    rows = pixels.reshape(height, -1).astype(dtype)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    parts.append(compressor.compress(raw))
  else:
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    row = b"\x00" * (1 + (width * channels * bit_depth + 7) // 8)
    block = row * 256
    for start in range(0, height, 256):
      parts.append(compressor.compress(block if height - start >= 256
                                       else row * (height - start)))
  parts.append(compressor.flush())
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n")
    f.write(_chunk(b"IHDR", header))
    if trns is not None:
      f.write(_chunk(b"tRNS", trns))
    f.write(_chunk(b"IDAT", b"".join(parts)))
    f.write(_chunk(b"IEND", b""))


def over_white(rgb: np.ndarray, alpha: np.ndarray, alpha_max: float = 255.0) -> np.ndarray:
  """jtl's transparency rule, written independently: round(a * c + (1 - a) * 255)."""
  a = alpha.astype(np.float64)[..., None] / alpha_max
  return np.round(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _gray3(gray: np.ndarray) -> np.ndarray:
  return np.repeat(gray[..., None], 3, axis=-1).astype(np.uint8)


def write_odd_images(directory: str) -> list[OddImage]:
  """Valid but unusual files, and what each must decode to."""
  os.makedirs(directory, exist_ok=True)
  out: list[OddImage] = []
  card = upright()
  rng = np.random.default_rng(0)

  def save(name, img, expected, tolerance=0, **kwargs):
    img.save(os.path.join(directory, name), **kwargs)
    out.append(OddImage(name, expected, tolerance))

  gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
  save("gray_L.png", Image.fromarray(gray, "L"), _gray3(gray))
  alpha = np.linspace(0, 255, 48).astype(np.uint8).reshape(6, 8)
  save("gray_alpha_LA.png", Image.fromarray(np.stack([gray, alpha], -1), "LA"),
       over_white(_gray3(gray), alpha))
  bits = (np.indices((6, 8)).sum(0) % 2).astype(bool)
  save("bilevel_1.png", Image.fromarray(bits).convert("1"), _gray3(bits * 255))

  palette_idx = (np.arange(48) % 4).reshape(6, 8).astype(np.uint8)
  colours = np.array([[250, 0, 0], [0, 250, 0], [0, 0, 250], [90, 90, 90]], np.uint8)
  pal = Image.fromarray(palette_idx, "P")
  pal.putpalette(colours.flatten().tolist())
  save("palette_P.png", pal, colours[palette_idx])
  expected_pt = colours[palette_idx].copy()
  expected_pt[palette_idx == 2] = 255            # index 2 fully transparent -> white
  save("palette_transparent_P.png", pal, expected_pt, transparency=2)
  save("palette_transparent.gif", pal, expected_pt, transparency=2)
  # Palette with partial alpha per entry (PNG tRNS holding one alpha per palette index).
  palette_alpha = np.array([255, 128, 0, 64], np.uint8)
  save("palette_alpha_P.png", pal,
       over_white(colours[palette_idx], palette_alpha[palette_idx]),
       transparency=palette_alpha.tobytes())

  rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  rgba_alpha = rng.integers(0, 256, (6, 8), dtype=np.uint8)
  rgba_alpha[0, 0], rgba_alpha[0, 1] = 0, 255
  rgba = Image.fromarray(np.concatenate([rgb, rgba_alpha[..., None]], -1), "RGBA")
  save("rgba.png", rgba, over_white(rgb, rgba_alpha))
  save("rgba_lossless.webp", rgba, over_white(rgb, rgba_alpha), lossless=True)
  save("rgb_lossless.webp", Image.fromarray(rgb), rgb, lossless=True)
  save("rgb.bmp", Image.fromarray(rgb), rgb)
  save("palette.bmp", pal, colours[palette_idx])
  save("UPPER_CASE.PNG", Image.fromarray(rgb), rgb)
  expected_trns = rgb.copy()
  rgb_trns = rgb.copy()
  rgb_trns[2, 3] = (1, 2, 3)
  expected_trns = rgb_trns.copy()
  expected_trns[np.all(rgb_trns == (1, 2, 3), axis=-1)] = 255
  save("rgb_trns.png", Image.fromarray(rgb_trns), expected_trns, transparency=(1, 2, 3))
  # PNG bytes behind a .jpg name: the content decides the decoder.
  save("png_named.jpg", Image.fromarray(rgb), rgb, format="PNG")

  # 16-bit: scaled by 255 / 65535 with rounding, never truncated or clipped.
  values16 = np.array([0, 1, 128, 129, 257, 32767, 32896, 65534, 65535, 1000, 40000, 65000],
                      np.uint16)
  gray16 = np.resize(values16, (6, 8)).astype(np.uint16)
  scaled16 = np.round(gray16 / 257.0).astype(np.uint8)
  save("gray16.png", Image.fromarray(gray16), _gray3(scaled16))
  rgb16 = rng.integers(0, 65536, (6, 8, 3), dtype=np.uint16)
  rgb16[0, 0] = (65535, 257, 0)
  write_png(os.path.join(directory, "rgb16.png"), rgb16, bit_depth=16, color_type=2)
  out.append(OddImage("rgb16.png", np.round(rgb16 / 257.0).astype(np.uint8)))
  alpha16 = rng.integers(0, 65536, (6, 8), dtype=np.uint16)
  alpha16[0, 0], alpha16[0, 1] = 0, 65535
  write_png(os.path.join(directory, "rgba16.png"), np.concatenate([rgb16, alpha16[..., None]], -1),
            bit_depth=16, color_type=6)
  a = alpha16.astype(np.float64)[..., None] / 65535.0
  out.append(OddImage("rgba16.png", np.round(rgb16 / 65535.0 * 255.0 * a
                                             + 255.0 * (1.0 - a)).astype(np.uint8)))

  # EXIF orientation: lossless PNGs (eXIf chunk) for all eight, and phone-style JPEGs.
  for orientation in range(1, 9):
    stored = stored_for_orientation(card, orientation)
    save(f"exif_orientation_{orientation}.png", stored, card, exif=exif_bytes(orientation))
  big_card = np.kron(card, np.ones((8, 8, 1), np.uint8))  # 48 x 64: JPEG blocks stay flat
  for orientation in (6, 8, 3):
    save(f"phone_orientation_{orientation}.jpg", stored_for_orientation(big_card, orientation),
         big_card, tolerance=12, quality=95, subsampling=0, exif=exif_bytes(orientation))

  # CMYK JPEG (pure cyan, pure magenta halves): Pillow's conversion is the reference.
  cmyk = np.zeros((16, 16, 4), np.uint8)
  cmyk[:, :8, 0] = 255
  cmyk[:, 8:, 1] = 255
  path = os.path.join(directory, "cmyk.jpg")
  Image.fromarray(cmyk, "CMYK").save(path, quality=95)
  with Image.open(path) as reread:
    assert reread.mode == "CMYK"
    reference = np.asarray(reread.convert("RGB"))
  expected = np.zeros((16, 16, 3), np.uint8)
  expected[:, :8] = (0, 255, 255)
  expected[:, 8:] = (255, 0, 255)
  assert np.abs(reference.astype(int) - expected).max() <= 8, "Pillow's CMYK reading changed"
  out.append(OddImage("cmyk.jpg", reference))
  return out


def write_bad_images(directory: str) -> dict[str, str]:
  """Unusable files and a word their reported reason must contain."""
  os.makedirs(directory, exist_ok=True)

  def path(name):
    return os.path.join(directory, name)

  open(path("empty.jpg"), "wb").close()
  noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
  buffer = io.BytesIO()
  noise.save(buffer, "JPEG", quality=90)  # ~ 10 KB, the cut falls inside the entropy-coded data
  with open(path("truncated.jpg"), "wb") as f:
    f.write(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
  buffer = io.BytesIO()
  noise.save(buffer, "PNG")
  with open(path("truncated.png"), "wb") as f:
    f.write(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
  with open(path("text.jpg"), "w", encoding="utf-8") as f:
    f.write("this is not an image, just a note someone saved with the wrong extension\n")
  with open(path("garbage.png"), "wb") as f:
    f.write(np.random.default_rng(2).integers(0, 256, 600, dtype=np.uint8).tobytes())
  # 10000 x 10000 pixels declared (1e8 > the 89.5 MP default), 1-bit, compressed to ~15 KB.
  write_png(path("bomb.png"), None, bit_depth=1, color_type=0, size=(10000, 10000))
  return {"empty.jpg": "empty", "truncated.jpg": "truncated", "truncated.png": "truncated",
          "text.jpg": "not an image", "garbage.png": "not an image",
          "bomb.png": "decompression bomb"}
