"""The base of the errors that blame the user's input, not jtl.

A leaf module: it imports nothing from jtl, so that every layer (config, data, weights, models)
can raise its own subclass without importing another layer.
"""


class UserError(Exception):
  """A mistake in the user's input (config, data, checkpoint file) whose message names the culprit.

  CLIs print it as one line and exit 2, without a traceback. Subclasses also keep the built-in
  base they had before (ValueError, FileNotFoundError, ...), so `except ValueError` still works.
  """


class ConfigError(UserError, ValueError):
  """A config value or combination that cannot work; the message names the key."""
