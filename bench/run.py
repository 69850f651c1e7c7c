"""Training-step speed of jtl next to the PyTorch yardstick, on the same machine in one run.

  .venv/bin/python bench/run.py                     # every case
  .venv/bin/python bench/run.py --quick             # the two cheapest cases
  .venv/bin/python bench/run.py --cases resnet50:full,efficientnet_b0:feature:192

Each case is a model, a strategy (feature: only the head trains; last: the last backbone stage
and the head; full: everything) and an input side; batch 32 of synthetic data, 10 classes,
random weights (the step time does not depend on the values). jtl's side is the engine's own
step from `jtl.steps.make_train_step` (freeze plan, optimizer, BatchNorm modes, shardings,
donated state; see jtl_step.py), compiled before the clock starts. The PyTorch side is the yardstick
`seed_torch_loop.py step` (kept outside the project, see ../shared/bench/README.md) run in a
subprocess with a torch environment when one is found: $JTL_TORCH_PYTHON, else
/tmp/torchenv/bin/python. Both report the median seconds per step after two warm-up steps.

The output is a ratio measured under the same conditions, not an absolute figure: the machine
may be shared, so every case shows the load average and the CPU that other jobs took while it
was timed (--rounds N alternates the two sides N times and keeps each side's fastest round).
Results go to bench/results.json.
"""
from __future__ import annotations

import argparse
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)  # the bench's own modules, whatever the working directory

import jax  # noqa: E402

import jtl_step  # noqa: E402  (puts this checkout's jtl on the path)
import machine  # noqa: E402
from jtl.models import create_model  # noqa: E402
from yardstick import Yardstick  # noqa: E402

# (model, strategy, input side): the yardstick's published cases.
CASES = (("efficientnet_lite0", "feature", 128),
         ("efficientnet_b0", "feature", 224),
         ("efficientnet_b0", "full", 224),
         ("resnet50", "feature", 224),
         ("resnet50", "last", 224),
         ("resnet50", "full", 224))
QUICK = CASES[:2]
DEFAULT_RES = {"efficientnet_lite0": 128}


def build_step(model_name: str, strategy: str, res: int, batch_size: int) -> jtl_step.JtlStep:
  """The engine's step for a yardstick case, random weights (values do not change the time)."""
  model = create_model(model_name, num_classes=jtl_step.NUM_CLASSES, image_size=res)
  step = jtl_step.JtlStep(model, jtl_step.freeze_depth_of(strategy, model.stage_names), res,
                          batch_size)
  step.name = f"{model_name} {strategy}"
  return step


def parse_cases(text: str) -> list[tuple[str, str, int]]:
  """"model:strategy[:res],..." -> cases (res defaults to the model's benchmark side)."""
  cases = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    parts = item.split(":")
    if len(parts) not in (2, 3):
      raise ValueError(f"--cases: {item!r} is not model:strategy[:res]")
    res = int(parts[2]) if len(parts) == 3 else DEFAULT_RES.get(parts[0], 224)
    cases.append((parts[0], parts[1], res))
  return cases


def _seconds(value) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def markdown_table(rows: list[dict]) -> str:
  lines = ["| model | strategy | res | jtl s/step | torch s/step | speed-up (torch/jtl) "
           "| load 1 min | other jobs (cores) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    speedup = "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}x"
    lines.append(f"| {r['model']} | {r['strategy']} | {r['res']} | {_seconds(r['jtl_s_per_step'])} "
                 f"| {_seconds(r['torch_s_per_step'])} | {speedup} | {r['load_1min']:.2f} "
                 f"| {machine.cores(r['other_jobs_cores'])} |")
  return "\n".join(lines)


def _torch_round(torch: Yardstick, case, args):
  """((s/step, other jobs' cores), threads) of one yardstick round; (None, None) if it broke."""
  try:
    with machine.OtherJobs() as others:
      result = torch.step_seconds(*case, args.batch, args.steps)
  except (RuntimeError, ValueError) as e:  # one broken case does not void the others
    print(f", torch failed: {e}", end="")
    return None, None
  print(f", torch {result['s_per_step']:.3f} s/step (other jobs {machine.cores(others.cores)} "
        f"cores)", end="")
  return (result["s_per_step"], others.cores), result["threads"]


def run_case(case, torch: Yardstick | None, args) -> tuple[dict, int | None]:
  """One case's row: both sides alternated `args.rounds` times, each side's fastest round."""
  model_name, strategy, res = case
  loads, jtl_runs, torch_runs, threads = [machine.load_1min()], [], [], None
  print(f"{model_name} {strategy} {res}px: compiling jtl's step ...", end="", flush=True)
  step = build_step(model_name, strategy, res, args.batch)
  print(f" {step.compile_seconds:.0f} s", flush=True)
  for _ in range(args.rounds):
    with machine.OtherJobs() as others:
      seconds = step.seconds_per_step(args.steps)
    jtl_runs.append((seconds, others.cores))
    print(f"  jtl {seconds:.3f} s/step (other jobs {machine.cores(others.cores)} cores)", end="",
          flush=True)
    if torch:
      torch_run, threads = _torch_round(torch, case, args)
      torch_runs += [torch_run] if torch_run else []
    loads.append(machine.load_1min())
    print(f"; load {loads[-1]:.2f}", flush=True)
  # Other jobs only ever slow a side down: its fastest round is the least disturbed one.
  jtl_best = min(jtl_runs)
  torch_best = min(torch_runs) if torch_runs else None
  disturbance = [c for c in (jtl_best[1], torch_best and torch_best[1]) if c is not None]
  return {"model": model_name, "strategy": strategy, "res": res,
          "jtl_s_per_step": jtl_best[0], "torch_s_per_step": torch_best and torch_best[0],
          "speedup": torch_best[0] / jtl_best[0] if torch_best else None,
          "load_1min": max(loads), "other_jobs_cores": max(disturbance) if disturbance else None,
          "jtl_rounds": jtl_runs, "torch_rounds": torch_runs,
          "jtl_compile_s": round(step.compile_seconds, 1), "flops": step.flops,
          "trainable_params": step.trainable_params, "total_params": step.total_params}, threads


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="only " + ", ".join(
      f"{m}:{s}:{r}" for m, s, r in QUICK))
  parser.add_argument("--cases", help="model:strategy[:res],... (strategy: feature|last|full)")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
  parser.add_argument("--rounds", type=int, default=1,
                      help="alternate jtl and torch this many times per case; each side's "
                      "fastest round counts (a shared machine disturbs rounds unevenly)")
  parser.add_argument("--no-torch", action="store_true", help="time jtl only")
  parser.add_argument("--out", default=machine.RESULTS)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  cases = parse_cases(args.cases) if args.cases else list(QUICK if args.quick else CASES)
  torch, why_not = (None, "--no-torch") if args.no_torch else Yardstick.find()
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} devices), "
        f"{os.cpu_count()} CPUs, {machine.load_line()} at the start")
  print(f"torch yardstick: {torch}" if torch
        else f"torch yardstick: not available ({why_not}); timing jtl only")
  rows, torch_threads = [], None
  for case in cases:
    row, threads = run_case(case, torch, args)
    rows.append(row)
    torch_threads = threads or torch_threads
  load_end = os.getloadavg()
  print()
  print(markdown_table(rows))
  print(f"\nbatch {args.batch}, median of {args.steps} steps after {jtl_step.WARMUP_STEPS} "
        f"warm-up steps, best of {args.rounds} round(s); {machine.load_line()} at the end")
  machine.update_results({
      "date": machine.now(), "machine": {**machine.describe(), "torch_threads": torch_threads},
      "batch": args.batch, "timed_steps": args.steps, "warmup_steps": jtl_step.WARMUP_STEPS,
      "rounds": args.rounds, "torch": torch is not None, "load_average_end": list(load_end),
      "cases": rows}, args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
