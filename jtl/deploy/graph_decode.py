"""The scan's decisions for one encoded image, made in TensorFlow ops, so a SavedModel can decode.

`jtl.data.decode.probe_bytes` (Pillow) tells the pipeline which decoder a file needs, its EXIF
orientation and, for a large JPEG, the DCT scale to decode it at. Pillow cannot run inside a
SavedModel, so `probe_graph` reads the same facts from the bytes themselves: the JPEG or PNG
signature, the PNG header and tRNS chunk (the rules of `decode._png_kind`), the EXIF orientation
tag (JPEG APP1 "Exif" segment or PNG eXIf chunk) and the JPEG's size (`jpeg_downscale`'s rule).
`decode_graph` then runs the pipeline's own `decode.decode_tf`. Files that need Pillow (WebP, GIF,
BMP, low-bit grey PNG with tRNS) are not decodable in the graph: the signature fails on them
with an InvalidArgument error; callers decode those on the host (see runtime.py), and so they do
CMYK JPEGs, which only the header's colour space tells apart: the graph takes them for JPEGs and
TF's decoder gives other colours than Pillow's conversion. Not read: EXIF in a PNG eXIf chunk
after the image data, or in a PNG text chunk (Pillow reads both; cameras write neither).
"""
from __future__ import annotations

from jtl.data import decode
from jtl.data.tf_setup import tf

_MAX_SEGMENTS = 64     # JPEG segments / PNG chunks walked before giving up on EXIF or tRNS
_MAX_IFD_ENTRIES = 256


def _bytes(data: tf.Tensor, pos: tf.Tensor, n: int) -> tf.Tensor:
  """int32 [n]: data[pos:pos + n], zeros past the end (a truncated header reads as zeros)."""
  padded = tf.strings.join([data, tf.constant(b"\0" * n)])
  start = tf.clip_by_value(pos, 0, tf.strings.length(data))
  return tf.cast(tf.io.decode_raw(tf.strings.substr(padded, start, n), tf.uint8), tf.int32)


def _uint(data, pos, n: int, little_endian) -> tf.Tensor:
  """An unsigned n-byte integer at pos, as int32 (values past 2**31 - 1 clipped: such an offset
  or length points past any file anyway)."""
  b = tf.cast(_bytes(data, pos, n), tf.int64)
  weights = tf.constant([256 ** i for i in range(n)][::-1], tf.int64)
  big = tf.reduce_sum(b * weights)
  little = tf.reduce_sum(b * tf.reverse(weights, [0]))
  return tf.cast(tf.minimum(tf.where(little_endian, little, big), 2 ** 31 - 1), tf.int32)


def _tiff_orientation(data: tf.Tensor, tiff: tf.Tensor) -> tf.Tensor:
  """Orientation tag 0x0112 of IFD0 of the TIFF block starting at tiff (1 when absent or odd)."""
  little = tf.reduce_all(tf.equal(_bytes(data, tiff, 2), [0x49, 0x49]))  # "II"; "MM" is big
  ifd = tiff + _uint(data, tiff + 4, 4, little)
  count = tf.minimum(_uint(data, ifd, 2, little), _MAX_IFD_ENTRIES)

  def body(i, found):
    entry = ifd + 2 + 12 * i
    is_tag = tf.equal(_uint(data, entry, 2, little), 0x0112)
    value = _uint(data, entry + 8, 2, little)
    return i + 1, tf.where(tf.logical_and(is_tag, tf.equal(found, 0)), value, found)

  _, value = tf.while_loop(lambda i, found: tf.logical_and(i < count, tf.equal(found, 0)),
                           body, [tf.constant(0), tf.constant(0)])
  return tf.where(tf.logical_and(value >= 1, value <= 8), value, 1)


def _jpeg_exif_start(data: tf.Tensor) -> tf.Tensor:
  """Where the TIFF block of the first APP1 "Exif" segment starts; -1 when there is none."""
  length = tf.strings.length(data)

  def body(step, pos, found):
    head = _bytes(data, pos, 4)
    is_exif = tf.logical_and(tf.equal(head[1], 0xE1),
                             tf.equal(tf.strings.substr(data, tf.minimum(pos + 4, length), 6),
                                      b"Exif\0\0"))
    # Image data starts at SOS (0xDA); EXIF only ever precedes it.
    stop = tf.logical_or(tf.not_equal(head[0], 0xFF), tf.equal(head[1], 0xDA))
    found = tf.where(is_exif, pos + 10, tf.where(stop, -2, found))
    return step + 1, pos + 2 + head[2] * 256 + head[3], found

  def more(step, pos, found):
    return tf.logical_and(tf.logical_and(step < _MAX_SEGMENTS, pos + 4 <= length),
                          tf.equal(found, -1))

  _, _, found = tf.while_loop(more, body, [tf.constant(0), tf.constant(2), tf.constant(-1)])
  return tf.maximum(found, -1)


def _png_chunks(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(has a tRNS chunk before IDAT, start of the eXIf chunk's data or -1)."""
  length = tf.strings.length(data)

  def body(step, pos, trns, exif, done):
    kind = tf.strings.substr(data, tf.minimum(pos + 4, length), 4)
    trns = tf.logical_or(trns, tf.equal(kind, b"tRNS"))
    exif = tf.where(tf.logical_and(tf.equal(kind, b"eXIf"), exif < 0), pos + 8, exif)
    done = tf.equal(kind, b"IDAT")
    return step + 1, pos + 12 + _uint(data, pos, 4, False), trns, exif, done

  def more(step, pos, trns, exif, done):
    return tf.logical_and(tf.logical_and(step < _MAX_SEGMENTS, pos + 8 <= length),
                          tf.logical_not(done))

  start = [tf.constant(0), tf.constant(8), tf.constant(False), tf.constant(-1), tf.constant(False)]
  _, _, trns, exif, _ = tf.while_loop(more, body, start)
  return trns, exif


def _png_kind(data: tf.Tensor, has_trns: tf.Tensor) -> tf.Tensor:
  """decode._png_kind's rules, on the IHDR bit depth and colour type."""
  ihdr = _bytes(data, 24, 2)
  depth, colour = ihdr[0], ihdr[1]
  alpha = tf.logical_or(tf.logical_or(tf.equal(colour, 4), tf.equal(colour, 6)),
                        tf.logical_and(has_trns, tf.logical_or(tf.equal(colour, 3), depth >= 8)))
  plain = tf.logical_and(tf.equal(depth, 8), tf.logical_or(tf.equal(colour, 0),
                                                            tf.equal(colour, 2)))
  return tf.where(alpha, decode.KIND_PNG_ALPHA,
                  tf.where(has_trns, decode.KIND_PIL,
                           tf.where(plain, decode.KIND_PNG, decode.KIND_PNG_SCALED)))


def jpeg_downscale_graph(height: tf.Tensor, width: tf.Tensor, min_side: int) -> tf.Tensor:
  """decode.jpeg_downscale in TF ops: the largest of 8, 4, 2 that keeps ceil(short / r) >=
  min_side, else 1."""
  if min_side <= 0:
    return tf.constant(1)
  short = tf.minimum(height, width)
  scale = tf.constant(1)
  for r in decode.JPEG_DOWNSCALES[1:]:  # ascending, so the largest that fits wins
    scale = tf.where((short + r - 1) // r >= min_side, r, scale)
  return scale


def probe_graph(data: tf.Tensor, decode_min_side: int = decode.DEFAULT_DECODE_MIN_SIDE):
  """(kind, orientation, downscale) int32 scalars for encoded bytes, as probe_bytes +
  jpeg_downscale decide them for JPEG and PNG files; kind is KIND_PIL for anything else."""
  head = _bytes(data, 0, 8)
  is_jpeg = tf.reduce_all(tf.equal(head[:3], [0xFF, 0xD8, 0xFF]))
  is_png = tf.equal(tf.strings.substr(data, 0, tf.minimum(8, tf.strings.length(data))),
                    b"\x89PNG\r\n\x1a\n")

  def jpeg():
    exif = _jpeg_exif_start(data)
    orientation = tf.where(exif >= 0, _tiff_orientation(data, tf.maximum(exif, 0)), 1)
    shape = tf.io.extract_jpeg_shape(data)
    return (tf.constant(decode.KIND_JPEG), orientation,
            jpeg_downscale_graph(shape[0], shape[1], decode_min_side))

  def png():
    trns, exif = _png_chunks(data)
    orientation = tf.where(exif >= 0, _tiff_orientation(data, tf.maximum(exif, 0)), 1)
    return _png_kind(data, trns), orientation, tf.constant(1)

  def other():
    return tf.constant(decode.KIND_PIL), tf.constant(1), tf.constant(1)

  return tf.case([(is_jpeg, jpeg), (is_png, png)], default=other, exclusive=True)


def decode_graph(data: tf.Tensor, decode_min_side: int = decode.DEFAULT_DECODE_MIN_SIDE):
  """Encoded JPEG or PNG bytes -> uint8 [H, W, 3] through decode.decode_tf, with the decisions
  of probe_graph; InvalidArgument for a file that needs Pillow."""
  kind, orientation, downscale = probe_graph(data, decode_min_side)
  decodable = tf.debugging.assert_less(kind, decode.KIND_PIL, message=(
      "only JPEG (RGB or grey) and PNG images decode inside the model; decode others on the "
      "host and call the `pixels` signature"))
  with tf.control_dependencies([decodable]):  # inside tf.map_fn too, where nothing else orders it
    data = tf.identity(data)
  return decode.decode_tf(data, kind, orientation, downscale, with_pil=False)
