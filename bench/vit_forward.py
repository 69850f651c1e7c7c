"""A ViT-S/14 (DINOv2) forward pass on the CPU, jtl next to timm, on the same cores in one run.

  .venv/bin/python bench/vit_forward.py [--rounds 3] [--batch 32] [--res 224]

What a frozen-backbone run spends its time on: eval-mode features of a batch. jtl's side is
`create_model("vit_small_patch14_dinov2")` (random weights: the time does not depend on the
values) applied under jit, its position grid resampled from 37x37 at every call as the model
does; timm's is `timm.create_model("vit_small_patch14_dinov2", img_size=224)` in eval mode under
`torch.inference_mode()`, with as many threads as cores. Each side runs in its own process
(jtl in this environment, timm in the torch one: $JTL_TORCH_PYTHON, else /tmp/torchenv), the two
alternated --rounds times; a round reports the median of --steps timed calls after two warm-up
calls, and each side keeps its fastest round (other jobs only slow a side down). The figure is
the ratio jtl / timm; results go to bench/results.json under "vit_forward".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
ARCH = "vit_small_patch14_dinov2"
WARMUP_CALLS = 2


def _median_seconds(call, steps: int) -> float:
  for _ in range(WARMUP_CALLS):
    call()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_jtl(batch: int, res: int, steps: int) -> dict:
  sys.path.insert(0, REPO)
  import jax
  import numpy as np

  from jtl.models import create_model
  model = create_model(ARCH, num_classes=0, image_size=res)
  forward = jax.jit(lambda v, x: model.module.apply(v, x, train=False))
  x = jax.device_put(np.random.default_rng(0).normal(size=(batch, res, res, 3)).astype(
      np.float32))
  variables = jax.device_put(model.variables)
  seconds = _median_seconds(lambda: forward(variables, x).block_until_ready(), steps)
  return {"s_per_batch": seconds, "params": model.num_params, "jax": jax.__version__,
          "threads": os.cpu_count()}


def time_timm(batch: int, res: int, steps: int) -> dict:
  import timm
  import torch
  torch.set_num_threads(os.cpu_count())
  model = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=res).eval()
  x = torch.randn(batch, 3, res, res)

  def call():
    with torch.inference_mode():
      model(x)
  seconds = _median_seconds(call, steps)
  return {"s_per_batch": seconds, "params": sum(p.numel() for p in model.parameters()),
          "torch": torch.__version__, "timm": timm.__version__,
          "threads": torch.get_num_threads()}


def torch_python() -> str | None:
  python = os.environ.get("JTL_TORCH_PYTHON") or "/tmp/torchenv/bin/python"
  return python if os.path.exists(python) else None


def run_side(python: str, side: str, args) -> dict:
  """One round of one side in a fresh process; its JSON line."""
  out = subprocess.run([python, os.path.abspath(__file__), "--side", side, "--batch",
                        str(args.batch), "--res", str(args.res), "--steps", str(args.steps)],
                       check=True, capture_output=True, text=True, cwd=REPO)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--side", choices=("jtl", "timm"), help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--res", type=int, default=224)
  parser.add_argument("--steps", type=int, default=5, help="timed calls per round")
  parser.add_argument("--rounds", type=int, default=3, help="alternations of the two sides")
  args = parser.parse_args(argv)
  if args.side:  # a worker: one side's figure as one JSON line
    timer = time_jtl if args.side == "jtl" else time_timm
    print(json.dumps(timer(args.batch, args.res, args.steps)))
    return 0

  sys.path.insert(0, BENCH)
  import machine
  timm_python = torch_python()
  print(f"{ARCH} forward, batch {args.batch}, {args.res} px, {os.cpu_count()} CPUs; "
        f"timm side: {timm_python or 'not available (no torch environment)'}; "
        f"{machine.load_line()}")
  rounds = []
  for r in range(args.rounds):
    row = {}
    for side, python in (("jtl", sys.executable), ("timm", timm_python)):
      if python is None:
        continue
      with machine.OtherJobs() as others:
        row[side] = run_side(python, side, args)
      row[side]["other_jobs_cores"] = others.cores
    rounds.append(row)
    print(f"round {r + 1}: " + ", ".join(
        f"{side} {v['s_per_batch']:.3f} s/batch (other jobs {machine.cores(v['other_jobs_cores'])}"
        " cores)" for side, v in row.items()), flush=True)
  best = {side: min((row[side] for row in rounds if side in row),
                    key=lambda v: v["s_per_batch"]) for side in rounds[0]}
  ratio = best["jtl"]["s_per_batch"] / best["timm"]["s_per_batch"] if "timm" in best else None
  print(f"\nbest round: jtl {best['jtl']['s_per_batch']:.3f} s/batch"
        + (f", timm {best['timm']['s_per_batch']:.3f} s/batch: jtl / timm = {ratio:.2f}x"
           if ratio else ""))
  machine.update_results({"vit_forward": {
      "date": machine.now(), "machine": machine.describe(), "model": ARCH, "batch": args.batch,
      "res": args.res, "timed_calls": args.steps, "warmup_calls": WARMUP_CALLS,
      "rounds": rounds, "best": best, "jtl_over_timm": ratio,
      "load_average_end": list(os.getloadavg())}})
  return 0


if __name__ == "__main__":
  sys.exit(main())
