"""The command line as a new user meets it: a mistake in a config file, a key or a value is one
`error:` line naming it (exit status 2), and `--help` answers without loading the library.

Every command's main(argv) runs in this process and fails before any training; two checks start
a child Python, where nothing else has loaded jax yet.
"""
import os
import subprocess
import sys

import pytest

from jtl import cli
from jtl.commands import ablate, config_args, lr_find, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_COMMANDS = [train.main, lr_find.main]  # the commands that take --config and --workdir


@pytest.fixture
def config_path(tmp_path):
  path = tmp_path / "my_config.py"
  path.write_text("from jtl.config import default_config\n\n"
                  "def get_config():\n  return default_config()\n")
  return str(path)


def _error_line(capsys, main, argv) -> str:
  """main(argv) exits with status 2 after exactly one line on stderr, `error: ...`."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  out, err = capsys.readouterr()
  assert exit_info.value.code == 2, err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert out == ""
  return err.strip()


@pytest.mark.parametrize("main", CONFIG_COMMANDS)
def test_an_unknown_key_is_named_with_ml_collections_suggestion(main, config_path, tmp_path,
                                                                 capsys):
  err = _error_line(capsys, main, ["--config", config_path, "--workdir", str(tmp_path / "w"),
                                   "--config.modle=resnet"])
  assert err == 'error: config.modle: unknown key (did you mean "model" instead of "modle"?)'
  err = _error_line(capsys, main, ["--config", config_path, "--workdir", str(tmp_path / "w"),
                                   "--config.optimzer.lr", "0.1"])  # the space-separated form
  assert err.startswith("error: config.optimzer.lr: unknown key") and '"optimizer"' in err
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("main", CONFIG_COMMANDS)
def test_a_value_of_the_wrong_type_names_the_key_and_the_type(main, config_path, tmp_path,
                                                              capsys):
  argv = ["--config", config_path, "--workdir", str(tmp_path / "w")]
  err = _error_line(capsys, main, [*argv, "--config.num_epochs=abc"])
  assert err.startswith("error: config.num_epochs: 'abc' is not of type int"), err
  err = _error_line(capsys, main, [*argv, "--config.augment.hflip=maybe"])
  assert err.startswith("error: config.augment.hflip: 'maybe' is not of type bool"), err


@pytest.mark.parametrize("main", CONFIG_COMMANDS)
def test_a_missing_config_file_is_named(main, tmp_path, capsys):
  missing = str(tmp_path / "nosuch.py")
  err = _error_line(capsys, main, ["--config", missing, "--workdir", str(tmp_path / "w")])
  assert err == f"error: --config {missing}: no such file"


@pytest.mark.parametrize("main", CONFIG_COMMANDS)
def test_a_broken_config_file_is_named_with_its_problem(main, tmp_path, capsys):
  syntax = tmp_path / "syntax.py"
  syntax.write_text("def get_config(:\n  pass\n")
  raises = tmp_path / "raises.py"
  raises.write_text("def get_config(arg=None):\n  raise RuntimeError('no dataset here')\n")
  workdir = ["--workdir", str(tmp_path / "w")]
  err = _error_line(capsys, main, ["--config", str(syntax), *workdir])
  assert err.startswith(f"error: --config {syntax}: syntax error at line 1"), err
  err = _error_line(capsys, main, ["--config", f"{raises}:photos", *workdir])
  assert err == (f"error: --config {raises}:photos: get_config('photos') raised RuntimeError: "
                 "no dataset here")


def test_debug_shows_the_traceback_instead(config_path, tmp_path, monkeypatch):
  argv = ["--config", config_path, "--workdir", str(tmp_path / "w"), "--config.modle=resnet"]
  with pytest.raises(config_args.CommandLineError, match="config.modle"):
    train.main([*argv, "--debug"])
  monkeypatch.setenv("JTL_DEBUG", "1")
  with pytest.raises(config_args.CommandLineError, match="config.modle"):
    lr_find.main(argv)


def test_overrides_keep_ml_collections_syntax_and_types(config_path):
  args = config_args.parse(
      [f"--config={config_path}", "--workdir", "w", "--config.num_epochs", "3",
       "--config.optimizer.lr=auto", "--noconfig.augment.hflip", "--config.dataset=folder:/x"],
      prog="jtl train", description="", workdir_help="")
  config = args.config
  assert (config.num_epochs, config.optimizer.lr, config.augment.hflip, config.dataset) == (
      3, "auto", False, "folder:/x")
  assert config.is_locked and args.workdir == "w" and not args.debug


def test_ablate_names_the_key_and_the_config_file(config_path, tmp_path, capsys):
  out = str(tmp_path / "ablation")
  err = _error_line(capsys, ablate.main, ["--config", config_path, "--out", out,
                                          "--set", "modle=resnet"])
  assert err == 'error: config.modle: unknown key (did you mean "model" instead of "modle"?)'
  err = _error_line(capsys, ablate.main, ["--config", config_path, "--out", out,
                                          "--grid", "num_epochs=1,abc"])
  assert err == "error: config.num_epochs: 'abc' is not of type int"
  missing = str(tmp_path / "nosuch.py")
  err = _error_line(capsys, ablate.main, ["--config", missing, "--out", out])
  assert err == f"error: --config {missing}: no such file"
  assert not os.path.exists(out)


def test_help_exits_0_with_the_usage(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: jtl COMMAND") and all(f"jtl {c} " in out for c in cli.COMMANDS)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: jtl train --config FILE") and "--config.KEY=VALUE" in out
  assert cli.main(["trian"]) == 2
  assert "error: unknown command 'trian'" in capsys.readouterr().err


def _child(code: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JTL_DEBUG": "0"}
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)


@pytest.mark.subprocess
def test_help_of_jtl_and_of_every_command_loads_no_library():
  done = _child(
      "import sys\n"
      "from jtl import cli\n"
      "assert cli.main(['--help']) == 0\n"
      "for command in cli.COMMANDS:\n"
      "  try:\n"
      "    cli.main([command, '--help'])\n"
      "  except SystemExit as e:\n"
      "    assert e.code == 0, (command, e.code)\n"
      "heavy = sorted(m for m in ('jax', 'flax', 'tensorflow', 'optax', 'orbax', 'jtl.train')\n"
      "               if m in sys.modules)\n"
      "print('loaded:', heavy)\n")
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip().splitlines()[-1] == "loaded: []"


@pytest.mark.subprocess
def test_the_documented_entry_reports_a_typo_in_one_line(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "jtl.main", "--config", "configs/partial_ft.py", "--workdir",
       str(tmp_path / "w"), "--config.modle=resnet"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JTL_DEBUG": "0"})
  assert done.returncode == 2
  assert done.stderr == ('error: config.modle: unknown key (did you mean "model" instead of '
                         '"modle"?)\n')
