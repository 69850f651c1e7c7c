"""What freezing saves, read from the compiled program: FLOPs, trainable parameters and seconds
per training step at every freeze depth, on images and on cached features.

  .venv/bin/python bench/freeze_costs.py                  # both models, timed
  .venv/bin/python bench/freeze_costs.py --no-time        # FLOPs and parameters only (fast)
  .venv/bin/python bench/freeze_costs.py --models efficientnet_lite0:128 --steps 5

For each freeze depth d (the first d stages frozen, from 0 = everything trains to all but the
head) the engine's step from `jtl.steps.make_train_step` is compiled twice: on images
(start_stage=0, the frozen prefix runs forward at every step) and on the prefix's outputs
(start_stage=d, what the feature cache feeds it; their shape from `make_features_fn` through
`jax.eval_shape`). FLOPs are the "flops" entry of XLA's `cost_analysis()` of the compiled step;
"prefix" is the same figure for the features function alone, so images ~ cached + prefix says
the cache removes exactly the frozen forward pass. Batch 32, 10 classes, random weights.
Seconds per step are measured in one run, image and cached step of a depth back to back, with
the load and the CPU other jobs took; compare rows of one run, not figures across machines.
Results go to the "freeze_costs" key of bench/results.json (rows of models not measured in this
run are kept from the last one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jtl_step  # noqa: E402  (puts this checkout's jtl on the path)
import machine  # noqa: E402
from jtl import distributed, steps  # noqa: E402
from jtl.models import create_model  # noqa: E402

MODELS = (("efficientnet_lite0", 128), ("resnet50", 224))
BATCH = 32


def prefix_flops(model, depth: int, res: int, batch_size: int) -> float | None:
  """FLOPs of the frozen prefix's forward pass (what the cache computes once per image)."""
  if depth == 0:
    return 0.0
  features = steps.make_features_fn(model, distributed.make_mesh(), stop_stage=depth)
  variables = model.variables
  images = jax.ShapeDtypeStruct((batch_size, res, res, 3), jnp.float32)
  compiled = features.lower(variables["params"], variables.get("batch_stats", {}),
                            images).compile()
  return jtl_step.flops_of(compiled)


def measure(model, depth: int, res: int, start_stage: int, args) -> dict:
  """One compiled step: its FLOPs, input, compile time and (unless --no-time) s/step."""
  step = jtl_step.JtlStep(model, depth, res, BATCH, start_stage=start_stage)
  row = {"flops": step.flops, "input_shape": list(step.input_shape),
         "compile_s": round(step.compile_seconds, 1),
         "trainable_params": step.trainable_params, "total_params": step.total_params,
         "s_per_step": None, "other_jobs_cores": None}
  if not args.no_time:
    with machine.OtherJobs() as others:
      row["s_per_step"] = step.seconds_per_step(args.steps, warmup=args.warmup)
    row["other_jobs_cores"] = others.cores
  return row


def depth_row(model, depth: int, res: int, args) -> dict:
  stage_names = model.stage_names
  row = {"model": model.name, "res": res, "batch": BATCH, "freeze_depth": depth,
         "date": machine.now(),
         "frozen": list(stage_names[:depth]), "load_1min_start": machine.load_1min(),
         "prefix_flops": prefix_flops(model, depth, res, BATCH),
         "images": measure(model, depth, res, 0, args)}
  row["cached"] = measure(model, depth, res, depth, args) if depth else None
  row["trainable_params"] = row["images"]["trainable_params"]
  row["load_1min_end"] = machine.load_1min()
  return row


def _g(flops) -> str:
  return "n/a" if flops is None else f"{flops / 1e9:.1f}"


def _s(seconds) -> str:
  return "-" if seconds is None else f"{seconds:.3f}"


def _frozen(row) -> str:
  names = row["frozen"]
  if not names:
    return "none (full)"
  return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"


def _others(row) -> str:
  values = [m["other_jobs_cores"] for m in (row["images"], row["cached"]) if m]
  values = [v for v in values if v is not None]
  return machine.cores(max(values)) if values else "n/a"


def markdown_table(rows: list[dict]) -> str:
  lines = ["| model | res | depth | frozen | trainable params | GFLOPs/step images "
           "| prefix GFLOPs | GFLOPs/step cached | cached input | s/step images "
           "| s/step cached | load 1 min | other jobs (cores) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    cached = r["cached"] or {}
    shape = "x".join(str(d) for d in cached.get("input_shape", [])[1:]) or "-"
    lines.append(
        f"| {r['model']} | {r['res']} | {r['freeze_depth']} | {_frozen(r)} "
        f"| {r['trainable_params']:,} | {_g(r['images']['flops'])} | {_g(r['prefix_flops'])} "
        f"| {_g(cached.get('flops')) if cached else '-'} | {shape} "
        f"| {_s(r['images']['s_per_step'])} | {_s(cached.get('s_per_step'))} "
        f"| {max(r['load_1min_start'], r['load_1min_end']):.2f} | {_others(r)} |")
  return "\n".join(lines)


def kept_rows(path: str, measured: set) -> list[dict]:
  """Earlier rows of the models not measured now (each row carries its own date and load), so
  that one model can be measured again on its own when the machine is quiet."""
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    earlier = json.load(f).get("freeze_costs", {}).get("rows", [])
  return [r for r in earlier if (r["model"], r["res"]) not in measured]


def parse_models(text: str) -> list[tuple[str, int]]:
  """"model:res,..." -> [(model, res)]."""
  out = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, _, res = item.partition(":")
    out.append((name, int(res or 224)))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", help="model:res,... (default efficientnet_lite0:128,"
                      "resnet50:224)")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per compiled step")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
  parser.add_argument("--no-time", action="store_true", help="FLOPs and parameters only")
  parser.add_argument("--out", default=machine.RESULTS)
  args = parser.parse_args(argv)
  models = parse_models(args.models) if args.models else list(MODELS)
  print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs, "
        f"{machine.load_line()} at the start", flush=True)
  rows = []
  for name, res in models:
    model = create_model(name, num_classes=jtl_step.NUM_CLASSES, image_size=res)
    for depth in range(len(model.stage_names)):
      rows.append(depth_row(model, depth, res, args))
      print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
  print()
  print(markdown_table(rows))
  print(f"\nbatch {BATCH}, median of {args.steps} steps after {args.warmup} warm-up step(s); "
        f"{machine.load_line()} at the end")
  machine.update_results({"freeze_costs": {
      "date": machine.now(), "machine": machine.describe(), "batch": BATCH,
      "timed_steps": None if args.no_time else args.steps, "warmup_steps": args.warmup,
      "load_average_end": list(os.getloadavg()),
      "rows": sorted(kept_rows(args.out, set(models)) + rows,
                     key=lambda r: (r["model"], r["res"], r["freeze_depth"]))}}, args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
