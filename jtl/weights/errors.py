"""Errors of the weights readers and of the merge into a model; a leaf module.

Importable from here by the readers (files, safetensors_file, torch_file) and by merge, so that
no reader has to import another to share the error type.
"""
from jtl.errors import UserError


class CheckpointError(UserError, ValueError):
  """A checkpoint file that cannot be read; the message names the file and the problem."""


class CheckpointMismatchError(UserError, ValueError):
  """The checkpoint does not fit the model."""
