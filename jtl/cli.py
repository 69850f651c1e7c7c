"""The `jtl` command (also `python -m jtl`): jtl COMMAND [ARGS...], COMMAND one of the modules
of jtl/commands/, imported only when it runs (`jtl --help` loads no library)."""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

COMMANDS = {  # the command's name -> its module, whose main(argv) -> int parses the rest
    "train": "jtl.commands.train",
    "lr-find": "jtl.commands.lr_find",
    "predict": "jtl.commands.predict",
    "export": "jtl.commands.export",
    "models": "jtl.commands.models",
    "ablate": "jtl.commands.ablate",
    "prune": "jtl.commands.prune",
    "report": "jtl.commands.report",
    "convert": "jtl.commands.convert",
}

USAGE = """usage: jtl COMMAND [ARGS...]   (jtl COMMAND --help for its options)

  jtl train --config configs/partial_ft.py --workdir runs/x [--config.KEY=VALUE ...]
  jtl lr-find --config configs/partial_ft.py --workdir runs/lrf [--config.KEY=VALUE ...]
  jtl predict (--model NAME | --workdir RUN) IMAGES_OR_FOLDERS... [--json | --csv]
  jtl predict --exported DIR [--format tflite] IMAGES_OR_FOLDERS... [--json | --csv]
  jtl export --workdir RUN --format saved_model,tflite,onnx --out DIR
  jtl models [PATTERN]
  jtl ablate --config configs/partial_ft.py --out runs/ablation [--grid KEY=V1,V2 ...]
  jtl prune --workdir runs/x --sparsity 0.5,0.7,0.9 [--method magnitude|channels] [--steps N]
  jtl report --workdir runs/x
  jtl convert folder:PATH|tfds:NAME OUT [--data_dir DIR] [--bad_images fail|skip]
"""


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2
  return importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":
  sys.exit(main())
