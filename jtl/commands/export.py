"""A finished run as SavedModel, TFLite and ONNX files (jtl/deploy/), all or nothing.

  jtl export --workdir runs/x --format saved_model,tflite,onnx --out exported/

Formats: saved_model, tflite, tflite_float16, tflite_int8, onnx. Each file written is checked
against jtl's own probabilities; a mistake prints one `error:` line, exit status 2, nothing
written.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from jtl import cli_errors


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jtl export",
                                   description="A finished run as SavedModel, TFLite, ONNX files")
  parser.add_argument("--workdir", required=True, help="a finished jtl run")
  parser.add_argument("--format", default="saved_model",
                      help="comma-separated: saved_model, tflite, tflite_float16, tflite_int8, "
                           "onnx (default saved_model)")
  parser.add_argument("--out", required=True,
                      help="directory to write (must not exist, or be empty); all or nothing")
  parser.add_argument("--debug", action="store_true",
                      help="show the traceback of an error (also: env JTL_DEBUG=1)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Returns 0; a user's mistake exits with status 2 after one `error:` line, nothing written."""
  args = _parser().parse_args(argv)
  with cli_errors.reported_errors(args.debug or cli_errors.debug_requested()):
    from jtl import export  # jax, TensorFlow: only once the arguments are read
    from jtl.deploy import build, layout
    formats = layout.parse_formats(args.format)
    export.check_finished_run(args.workdir)
    build.check_destination(formats, args.out)
    manifest = build.write_export(export.load_exported(args.workdir), formats, args.out,
                                  args.workdir)
    for fmt, entry in manifest.formats.items():
      print(f"{os.path.join(args.out, entry['path'])}  {entry['bytes'] / 1e6:.2f} MB  "
            f"max |p - p_jtl| {entry['max_abs_diff_vs_jtl']:.1e}")
  return 0
