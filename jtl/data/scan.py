"""One validating pass over every image file before training, and the bad-file policy.

A bad file found in the middle of epoch 3 costs a crashed run; found here it costs one clear
message. The pass runs in a thread pool: Pillow releases the GIL while it decodes and the file
reads are I/O, so threads scale across cores without the pickling cost of processes.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import warnings
from typing import Sequence

from PIL import Image

from jtl.data import decode
from jtl.data.errors import DataError

BAD_IMAGE_POLICIES = ("fail", "skip")
SKIPPED_FILES_NAME = "skipped_files.txt"

log = logging.getLogger(__name__)


def _default_workers() -> int:
  # More threads than cores: part of each probe is waiting on the disk.
  return min(32, 4 * (os.cpu_count() or 1))


def scan_files(paths: Sequence[str], max_pixels: int = decode.DEFAULT_MAX_IMAGE_PIXELS,
               num_workers: int | None = None) -> list[decode.ImageInfo | str]:
  """probe_file for every path, in order: an ImageInfo, or the reason the file is unusable."""
  if not paths:
    return []
  workers = num_workers or _default_workers()
  # Chunks amortise the executor's per-task overhead, which dominates for tiny images.
  chunk = max(1, min(256, len(paths) // (workers * 4) or 1))
  chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]

  def probe_chunk(chunk_paths):
    return [decode.probe_file(p, max_pixels) for p in chunk_paths]

  results: list[decode.ImageInfo | str] = []
  # The scan applies its own pixel limit and reports oversized files; Pillow's warning about them
  # would only repeat it. (Pillow's hard limit, 2 x Image.MAX_IMAGE_PIXELS, still applies.)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jtl-scan") as pool:
      for part in pool.map(probe_chunk, chunks):
        results.extend(part)
  return results


def host_share(paths: Sequence[str], host: int, hosts: int) -> Sequence[str]:
  """The files host `host` of `hosts` probes: every hosts-th one (interleaved, so that a folder
  sorted by class or by size gives each host a like share of the work)."""
  return paths[host::hosts]


def merge_host_shares(shares: Sequence[Sequence], count: int) -> list:
  """The results of every host's share (host_share), back in the order of the `count` paths."""
  merged: list = [None] * count
  for host, share in enumerate(shares):
    merged[host::len(shares)] = share
  return merged


def to_json(result: decode.ImageInfo | str):
  return result if isinstance(result, str) else dataclasses.astuple(result)


def from_json(value) -> decode.ImageInfo | str:
  return value if isinstance(value, str) else decode.ImageInfo(*value)


def scan_files_across_hosts(paths: Sequence[str], max_pixels: int, num_workers: int | None
                            ) -> list[decode.ImageInfo | str]:
  """scan_files, with the probing split between the hosts of a multi-host run (each probes
  its share of the files and every host receives all results); on one host, scan_files."""
  import jax  # pylint: disable=import-outside-toplevel
  hosts = jax.process_count()
  if hosts == 1:
    return scan_files(paths, max_pixels, num_workers)
  from jtl import distributed  # pylint: disable=import-outside-toplevel
  mine = scan_files(host_share(list(paths), jax.process_index(), hosts), max_pixels,
                    num_workers)
  shares = distributed.all_gather_json([to_json(r) for r in mine])
  log.info("probed %d of %d files on this host (%d hosts share the scan)", len(mine),
           len(paths), hosts)
  return [from_json(v) for v in merge_host_shares(shares, len(paths))]


def apply_bad_image_policy(bad: Sequence[tuple[str, str]], *, policy: str, root: str,
                           report_dir: str | None) -> None:
  """Raise one ValueError listing every bad file ("fail"), or record and log them ("skip")."""
  if policy not in BAD_IMAGE_POLICIES:
    raise DataError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {policy!r}")
  if not bad:
    return
  if policy == "fail":
    lines = "\n".join(f"  {path}: {reason}" for path, reason in bad)
    raise DataError(
        f"{len(bad)} unusable image file(s) under {root} (bad_images='fail'; fix or remove them, "
        f"or pass bad_images='skip' to train without them):\n{lines}")
  where = ""
  if report_dir:
    os.makedirs(report_dir, exist_ok=True)
    report = os.path.join(report_dir, SKIPPED_FILES_NAME)
    with open(report, "w", encoding="utf-8") as f:
      for path, reason in bad:
        f.write(f"{path}\t{reason}\n")
    where = f"; listed in {report}"
  log.warning("skipped %d unusable image file(s) under %s%s", len(bad), root, where)
