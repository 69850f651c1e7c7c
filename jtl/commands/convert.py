"""jtl convert SOURCE OUT: an image folder or a prepared tfds dataset as sharded ArrayRecord
files, once; then train with --config.dataset=records:OUT (see jtl.data.convert, which
`python -m jtl.data.convert` runs too)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from jtl import cli_errors

BAD_IMAGE_POLICIES = ("fail", "skip")  # jtl.data.scan's, named here so --help loads no TF


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="jtl convert", description="Convert an image folder or a prepared tfds dataset into "
      "sharded ArrayRecord files; then train with --config.dataset=records:OUT.")
  parser.add_argument("source", help="folder:PATH or tfds:NAME")
  parser.add_argument("out", help="the directory to write (must not exist)")
  parser.add_argument("--data_dir", default=None, help="tfds data_dir of a tfds:NAME source")
  parser.add_argument("--bad_images", default="fail", choices=BAD_IMAGE_POLICIES,
                      help="fail: list every unusable image and write nothing; skip: leave "
                      "them out and list them in OUT/skipped_files.txt")
  parser.add_argument("--records_per_shard", type=int, default=10_000)
  parser.add_argument("--max_image_pixels", type=int, default=89_478_485)
  parser.add_argument("--workers", type=int, default=None,
                      help="probe threads (default: 2 per core)")
  parser.add_argument("--debug", action="store_true", help="show tracebacks")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  with cli_errors.reported_errors(args.debug or cli_errors.debug_requested()):
    from jtl.data import convert  # pylint: disable=import-outside-toplevel
    out = convert.convert(args.source, args.out, data_dir=args.data_dir,
                          bad_images=args.bad_images, records_per_shard=args.records_per_shard,
                          max_image_pixels=args.max_image_pixels, workers=args.workers)
    print(f"wrote {out}; train on it with --config.dataset=records:{out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
