"""The arguments of the commands that run a config (train, lr-find):

  --config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...] [--debug]

argparse reads the command's own flags; the overrides go to ml_collections' config_flags, so
they keep its syntax and its typing by the default's type, in a FlagValues of their own (a
command can run twice in one process). Each mistake is a UserError naming the file, the key or
the flag, which the command prints as one `error:` line (jtl.cli_errors).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from jtl import config as config_lib  # noqa: F401  (registers optimizer.lr's override parser)
from jtl import config_file
from jtl.errors import UserError

# config_flags' own pattern for an override: --config.KEY=VALUE, --config.KEY VALUE, and
# --noconfig.KEY for a boolean.
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


class CommandLineError(UserError):
  """An override that names no key, or whose value does not parse as the key's type.

  Not a ValueError: absl's flag parsing would wrap one into a message of its own."""


@dataclasses.dataclass(frozen=True)
class ConfigArgs:
  config: ml_collections.ConfigDict   # overrides applied, locked
  workdir: str
  debug: bool


def parser(prog: str, description: str, workdir_help: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=prog, description=description,
      usage=f"{prog} --config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...] [--debug]",
      epilog="--config.KEY=VALUE overrides one key of the config (repeatable), typed like its "
             "default: --config.num_epochs=3 --config.optimizer.lr=3e-4 "
             "--config.dataset=folder:/path/to/images. A mistake prints one `error:` line "
             "naming the file or key and exits with status 2.")
  p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                 help="experiment config file (configs/*.py); ARG goes to its get_config()")
  p.add_argument("--workdir", required=True, metavar="DIR", help=workdir_help)
  p.add_argument("--debug", action="store_true",
                 help="show the traceback of a configuration, data or checkpoint error instead "
                      "of one line (also: env JTL_DEBUG=1)")
  return p


def parse(argv: Sequence[str], *, prog: str, description: str,
          workdir_help: str) -> ConfigArgs:
  """The config file loaded, its overrides applied; --help prints the usage and exits 0."""
  args, rest = parser(prog, description, workdir_help).parse_known_args(list(argv))
  config = config_file.load(args.config)
  return ConfigArgs(apply_overrides(config, rest), args.workdir, args.debug)


def apply_overrides(config, argv: Sequence[str]):
  """`config` with the --config.KEY=VALUE overrides in `argv` applied (ml_collections' parsing),
  then locked. Every key is checked first, so that an unknown one is named in full."""
  keys = [match.group(1) for arg in argv if (match := _OVERRIDE.match(arg))]
  for key in keys:
    if (problem := config_file.unknown_key(config, key)) is not None:
      raise CommandLineError(problem)
  values = flags.FlagValues()
  argv = ["jtl", *argv]
  # With a ConfigDict default, config_flags defines one flag per override found in sys_argv.
  config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=argv,
                                  lock_config=True)
  for key in keys:
    flag = values[f"config.{key}"]
    # Keywords: absl caches a parser built from positional arguments alone.
    flag.parser = _NamingParser(key=key, parser=flag.parser,
                                field_type=config_path.get_type(key, config))
  try:
    unparsed = values(argv)
  except flags.Error as e:  # an unknown flag, a repeated one
    raise CommandLineError(str(e).strip().split("\n")[0]) from e
  except (TypeError, ValueError) as e:  # a value of the key's type that the field refused
    raise CommandLineError(str(e).strip().split("\n")[0]) from e
  if unparsed[1:]:
    raise CommandLineError(f"unexpected arguments: {' '.join(unparsed[1:])}")
  return values.config


class _NamingParser(flags.ArgumentParser):
  """The parser ml_collections chose for an override's key, whose failure names the key and
  the type it wants (absl's own message would say "flag --config.KEY=VALUE: ...")."""

  def __init__(self, key: str, parser: flags.ArgumentParser, field_type):
    self._key, self._parser = key, parser
    self._wanted = f"of type {field_type.__name__}" if isinstance(field_type, type) else "valid"

  def parse(self, argument):
    try:
      return self._parser.parse(argument)
    except (TypeError, ValueError, OverflowError) as e:
      # absl's BooleanParser raises ValueError(message, argument): the message alone.
      text = e.args[0] if len(e.args) > 1 and isinstance(e.args[0], str) else str(e)
      problem = text.strip().split("\n")[0]
      raise CommandLineError(
          f"config.{self._key}: {argument!r} is not {self._wanted} ({problem})") from e

  def flag_type(self) -> str:
    return self._parser.flag_type()
