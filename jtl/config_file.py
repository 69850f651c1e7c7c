"""A config file (configs/*.py) read into its ConfigDict, and the keys a command line names in it.

Both fail with a message naming the file or the key, as a command prints it on one line:
ml_collections' own loader defers a missing file to a later "Configuration is not available"
that names neither, and its unknown-key error names only the last part of the key.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

import ml_collections
from ml_collections.config_flags import config_path

from jtl.errors import UserError

# The module name ml_collections' loader gives a `--config` file: a config that looks itself up
# in sys.modules (a dataclass, a pickle) behaves as it did under `config_flags`.
MODULE_NAME = "config_config"


class ConfigFileError(UserError):
  """A config file that is missing, does not load, or whose get_config() fails.

  Not a ValueError: absl's flag parsing would wrap one into a message of its own."""


def load(spec: str) -> ml_collections.ConfigDict:
  """get_config() of `spec`, FILE or FILE:ARG as `--config` takes it (ARG goes to get_config)."""
  path, colon, arg = spec.partition(":")
  if not path:
    raise ConfigFileError(f"--config {spec!r}: no file named")
  if not os.path.isfile(path):
    raise ConfigFileError(f"--config {path}: no such file")
  try:
    module = _execute(path)
  except SyntaxError as e:
    raise ConfigFileError(f"--config {path}: syntax error at line {e.lineno}: {e.msg}") from e
  except Exception as e:
    raise ConfigFileError(f"--config {path}: loading it raised {_one_line(e)}") from e
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigFileError(f"--config {path}: defines no get_config()")
  call = f"get_config({arg!r})" if colon else "get_config()"
  try:
    config = get_config(*([arg] if colon else []))
  except Exception as e:
    raise ConfigFileError(f"--config {spec}: {call} raised {_one_line(e)}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigFileError(f"--config {spec}: {call} returned {type(config).__name__}, not an "
                          "ml_collections.ConfigDict")
  return config


def _execute(path: str):
  loader = importlib.machinery.SourceFileLoader(MODULE_NAME, path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(MODULE_NAME, loader))
  sys.modules[MODULE_NAME] = module
  loader.exec_module(module)
  return module


def _one_line(e: BaseException) -> str:
  first = str(e).strip().split("\n")[0]
  return f"{type(e).__name__}: {first}" if first else type(e).__name__


def unknown_key(config, key: str) -> str | None:
  """None when `key` ("optimizer.lr") names a field of `config`; otherwise the message saying
  so, with ml_collections' suggestion of a close name when it has one:
  'config.optimzer.lr: unknown key (did you mean "optimizer"?)'."""
  try:
    parts = config_path.split(key)
  except ValueError:
    return f"config.{key}: not a key (keys look like optimizer.lr)"
  holder = config
  for part in parts:
    if isinstance(holder, ml_collections.ConfigDict) and isinstance(part, str):
      if part not in holder:
        # ml_collections' own suggestion, the one its KeyError would carry.
        suggestion = holder._generate_did_you_mean_message(part)  # pylint: disable=protected-access
        hint = f" ({suggestion[0].lower()}{suggestion[1:]})" if suggestion else ""
        return f"config.{key}: unknown key{hint}"
      holder = holder[part]
      continue
    break  # inside a list, tuple or dict value: config_path's own lookup below decides
  try:
    config_path.get_type(key, config)
  except (KeyError, AttributeError, IndexError, TypeError, ValueError) as e:
    return f"config.{key}: unknown key ({_one_line(e)})"
  return None
