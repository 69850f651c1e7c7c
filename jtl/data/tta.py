"""Test-time augmentation: the views that the final test evaluation (config.tta) and
`jtl.predict --tta` score, defined once here and used by both.

Modes: "flip" is the eval view and its mirror (2 views); "crops" five S x S crops of the eval
transform's resize: the centre one (the eval view itself), then top-left, top-right,
bottom-left and bottom-right (5 views); "flip+crops" those five and their mirrors (10). ""
and "none" are off. Each view is cut from the very resize the eval transform makes
(preprocess.eval_resize), so view 0 is bit for bit the plain eval view. The model's logits are
averaged over the views (jtl.steps.make_eval_step, and predict alike): a geometric mean of the
views' probabilities, renormalised by the softmax.

Crops need room: the eval resize's short side, floor(S / crop_pct), must exceed the crop side S
by MIN_CROP_MARGIN pixels or more, or the corner crops of a square image would coincide with
the centre one (crop_pct = 1, i.e. image size equal to the resize, leaves no room at all).
"""
from __future__ import annotations

import functools

import numpy as np

from jtl.data.preprocess import (Preprocess, centre_offsets, eval_resize, eval_resize_side,
                                 load_eval_image, square_crop, to_pixels)
from jtl.data.tf_setup import tf

MODES = ("", "none", "flip", "crops", "flip+crops")
MIN_CROP_MARGIN = 2  # pixels: a centre offset of >= 1 then differs from both corners
_VIEWS = {"flip": 2, "crops": 5, "flip+crops": 10}


def is_on(mode: str) -> bool:
  return mode not in ("", "none")


def num_views(mode: str) -> int:
  if mode not in MODES:
    raise ValueError(f"tta mode must be one of {MODES}, got {mode!r}")
  return _VIEWS.get(mode, 1)


def crop_problem(mode: str, pp: Preprocess) -> str | None:
  """Why `mode` cannot run with this preprocessing (None: it can)."""
  if "crops" not in mode:
    return None
  side = eval_resize_side(pp)
  if side - pp.image_size < MIN_CROP_MARGIN:
    return (f"crops need the eval resize (short side floor({pp.image_size} / crop_pct "
            f"{pp.crop_pct}) = {side}) to exceed the {pp.image_size}-pixel crop by at least "
            f"{MIN_CROP_MARGIN} pixels, or the corner crops equal the centre one; use 'flip', "
            "or weights whose crop_pct is below 1")
  return None


def view_pixels(image: tf.Tensor, pp: Preprocess, mode: str) -> tf.Tensor:
  """uint8 [H, W, 3] -> the views of `mode`, uint8 [V, S, S, 3] (view 0: the eval view)."""
  num_views(mode)  # an unknown mode fails here
  size = pp.image_size
  resized = eval_resize(image, pp)
  offsets = [centre_offsets(resized, size)]
  if "crops" in mode:
    shape = tf.shape(resized)
    bottom, right = shape[0] - size, shape[1] - size
    offsets += [(0, 0), (0, right), (bottom, 0), (bottom, right)]
  views = [to_pixels(square_crop(resized, top, left, size)) for top, left in offsets]
  if "flip" in mode:
    views += [tf.reverse(v, [1]) for v in views]
  return tf.stack(views)


@functools.lru_cache(maxsize=None)
def views_transform(mode: str):
  """(image, pp) -> view_pixels(image, pp, mode): one function object per mode, so that
  load_eval_image traces its graph once per (preprocessing, mode)."""
  return functools.partial(view_pixels, mode=mode)


def load_views(source, pp: Preprocess, mode: str, **decode_options) -> np.ndarray:
  """An image file -> its views through the eval pipeline's decoding, float32 [V, S, S, 3]:
  what the final evaluation with config.tta=mode feeds the model for that file."""
  return load_eval_image(source, pp, pixels=views_transform(mode), **decode_options)
