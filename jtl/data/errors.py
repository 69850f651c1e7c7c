"""Errors in the user's data (missing folders, bad images, empty classes, bad data settings).

A leaf module under jtl.data. Each class keeps the built-in base that the data code raised before
(ValueError, FileNotFoundError, FileExistsError), so existing `except` clauses still catch it.
"""
from jtl.errors import UserError


class DataError(UserError, ValueError):
  """A dataset, folder, image file or data setting that cannot be used; the message names it."""


class DataFileNotFoundError(DataError, FileNotFoundError):
  """A data file or folder the user pointed at (or that a step needs) does not exist."""


class DataFileExistsError(DataError, FileExistsError):
  """An output path the user chose already holds something that must not be overwritten."""
