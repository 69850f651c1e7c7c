"""Size and CPU latency of each `jtl export` format, next to jtl's own jitted forward pass.

  python bench/export_formats.py --out runs/bench/export_formats [--workdir runs/demo]

Without --workdir it builds the demo's model as a finished run (EfficientNet-Lite0 with its
ImageNet weights and a fresh 10-class head at 64 px, configs/partial_ft.py's settings; the
latencies do not depend on the head's values). Latency is the median wall time of one call on a
batch of eval crops (uint8 [N, S, S, 3]; decoding is not timed), after a warm-up call, measured
on whatever else the machine runs: the load average is printed with the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jtl import export  # noqa: E402
from jtl.data.preprocess import Preprocess, normalize  # noqa: E402
from jtl.deploy import build, layout, runtime  # noqa: E402
from jtl.models import create_model  # noqa: E402
from jtl.run_record import RunRecord  # noqa: E402

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
BATCHES = {1: 50, 32: 12}  # batch size -> timed calls


def demo_run(workdir: str) -> str:
  if not os.path.isfile(os.path.join(workdir, export.EXPORT_DIR, "model.json")):
    model = create_model("efficientnet_lite0", num_classes=len(FASHION), pretrained=True,
                         image_size=64)
    record = RunRecord.of_run("efficientnet_lite0", model, FASHION, 64, "partial", 6)
    export.export_model(workdir, model.variables, record)
  return workdir


def median_ms(fn, x, calls: int) -> float:
  fn(x)  # warm-up: compilation, allocation
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    fn(x)
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def measure(workdir: str, exported: str) -> list[dict]:
  model = export.load_exported(workdir)
  pp = Preprocess.from_pretrained_cfg(model.pretrained_cfg)
  rows = [{"format": "jtl (JAX jit)", "bytes": os.path.getsize(
      os.path.join(workdir, export.EXPORT_DIR, "model.safetensors"))}]
  jax_fn = lambda crops: np.asarray(model.predict(normalize(crops, pp).numpy()))  # noqa: E731
  runners = [(rows[0], jax_fn)]
  manifest = layout.Manifest.read(exported)
  for fmt, entry in manifest.formats.items():
    row = {"format": fmt, "bytes": entry["bytes"], "max_abs_diff": entry["max_abs_diff_vs_jtl"]}
    rows.append(row)
    runners.append((row, runtime.open_exported(exported, fmt).crops_probabilities))
  rng = np.random.default_rng(0)
  for batch, calls in BATCHES.items():
    crops = rng.integers(0, 256, (batch, pp.image_size, pp.image_size, 3), np.uint8)
    for row, fn in runners:
      row[f"ms_batch{batch}"] = median_ms(fn, crops, calls)
  return rows


def table(rows: list[dict]) -> str:
  lines = ["| format | size | batch 1 | batch 32 | max \\|p - p_jtl\\| |",
           "|---|---:|---:|---:|---:|"]
  for r in rows:
    diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
    lines.append(f"| {r['format']} | {r['bytes'] / 1e6:.1f} MB | {r['ms_batch1']:.1f} ms | "
                 f"{r['ms_batch32']:.0f} ms | {diff} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/bench/export_formats")
  parser.add_argument("--workdir", default=None, help="a finished run (default: the demo model)")
  args = parser.parse_args()
  workdir = args.workdir or demo_run(os.path.join(args.out, "run"))
  exported = os.path.join(args.out, "exported")
  if not os.path.isdir(exported):
    start = time.perf_counter()
    build.write_export(export.load_exported(workdir), layout.FORMATS, exported, workdir)
    print(f"exported all formats in {time.perf_counter() - start:.0f} s")
  rows = measure(workdir, exported)
  load = os.getloadavg()
  machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
  print(table(rows))
  print(f"machine: {machine}; load average before/after: {load}")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"rows": rows, "machine": machine, "load_average": load}, f, indent=2)


if __name__ == "__main__":
  main()
