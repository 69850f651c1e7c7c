"""TensorFlow as used by the input pipeline: CPU only and quiet.

Imported (through `jtl.data`) before anything else touches TensorFlow, because both settings only
take effect before TF initialises its devices: the accelerators belong to JAX, and a TF that grabs
a GPU would reserve most of its memory for nothing.
"""
from __future__ import annotations

import logging
import os

# Only the C++ logs after absl's initialisation obey this; the one oneDNN line printed while
# the library loads cannot be silenced without turning oneDNN off.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel(logging.ERROR)


def _hide_accelerators() -> None:
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):
    # Devices already initialised by someone else, or no such device type in this build.
    pass
  if tf.config.get_visible_devices("GPU"):
    logging.getLogger(__name__).warning(
        "TensorFlow was initialised before jtl.data and holds a GPU; import jtl.data first")


_hide_accelerators()

__all__ = ["tf"]
