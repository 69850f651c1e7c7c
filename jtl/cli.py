"""The `jtl` command: jtl train | lr-find | predict | export | models | ablate | prune, each the
module of that name."""
from __future__ import annotations

import sys

USAGE = """usage: jtl COMMAND [ARGS...]

  jtl train --config configs/partial_ft.py --workdir runs/x [--config.KEY=VALUE ...]
  jtl lr-find --config configs/partial_ft.py --workdir runs/lrf [--config.KEY=VALUE ...]
  jtl predict (--model NAME | --workdir RUN) IMAGES_OR_FOLDERS... [--json | --csv]
  jtl predict --exported DIR [--format tflite] IMAGES_OR_FOLDERS... [--json | --csv]
  jtl export --workdir RUN --format saved_model,tflite,onnx --out DIR
  jtl models [PATTERN]
  jtl ablate --config configs/partial_ft.py --out runs/ablation [--grid KEY=V1,V2 ...]
  jtl prune --workdir runs/x --sparsity 0.5,0.7,0.9 [--method magnitude|channels] [--steps N]
"""


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0
  command, rest = argv[0], argv[1:]
  if command == "train":
    from jtl import main as train_main
    return train_main.run([f"jtl {command}", *rest])
  if command == "lr-find":
    from jtl.lr_find import __main__ as lr_find_main
    return lr_find_main.run([f"jtl {command}", *rest])
  if command == "predict":
    from jtl import predict
    return predict.main(rest)
  if command == "models":
    from jtl.models import __main__ as models_main
    return models_main.main([f"jtl {command}", *rest])
  if command == "export":
    from jtl import export
    return export.main(rest)
  if command == "ablate":
    from experiments import ablate
    return ablate.main(rest)
  if command == "prune":
    from jtl import prune
    return prune.main(rest)
  print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
