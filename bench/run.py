"""Training-step speed of jtl next to the PyTorch yardstick, on the same machine in one run.

  .venv/bin/python bench/run.py                     # every case
  .venv/bin/python bench/run.py --quick             # the two cheapest cases
  .venv/bin/python bench/run.py --cases resnet50:full,efficientnet_b0:feature:192

Each case is a model, a strategy (feature: only the head trains; last: the last backbone stage
and the head; full: everything) and an input side; batch 32 of synthetic data, 10 classes,
random weights (the step time does not depend on the values). jtl's side is the jitted
`jtl.train.train_step`, built as `train_and_evaluate` builds it (freeze plan, optimizer,
shardings, donated state), compiled before the clock starts. The PyTorch side is the yardstick
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
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)  # run as a script from anywhere: jtl from this checkout

from jtl import config as config_lib  # noqa: E402
from jtl import optim, train  # noqa: E402
from jtl import params as P  # noqa: E402
from jtl.models import create_model  # noqa: E402

# (model, strategy, input side): the yardstick's published cases.
CASES = (("efficientnet_lite0", "feature", 128),
         ("efficientnet_b0", "feature", 224),
         ("efficientnet_b0", "full", 224),
         ("resnet50", "feature", 224),
         ("resnet50", "last", 224),
         ("resnet50", "full", 224))
QUICK = CASES[:2]
DEFAULT_RES = {"efficientnet_lite0": 128}
NUM_CLASSES = 10
WARMUP_STEPS = 2  # the yardstick also drops its first two steps
# The yardstick lives beside the repository (its parent holds shared/), never inside it.
DEFAULT_YARDSTICK = os.path.join(REPO, os.pardir, "shared", "bench", "seed_torch_loop.py")
DEFAULT_TORCH_PYTHON = "/tmp/torchenv/bin/python"


def engine_config(strategy: str, stage_names) -> "ml_collections.ConfigDict":
  """The engine's config for a yardstick strategy, with the yardstick's Adam at lr 1e-3."""
  c = config_lib.default_config()
  if strategy == "feature":
    c.strategy = "feature_extraction"
  elif strategy == "last":
    c.strategy, c.freeze_depth = "partial", len(stage_names) - 2
  elif strategy == "full":
    c.strategy = "full"
  else:
    raise ValueError(f"strategy must be feature, last or full, got {strategy!r}")
  c.optimizer.name = "adam"
  c.optimizer.lr = 1e-3
  c.schedule.name = "constant"
  c.schedule.warmup_epochs = 0.0
  return c


class JtlStep:
  """The engine's jitted train_step for one case, compiled once and timed in rounds."""

  def __init__(self, model_name: str, strategy: str, res: int, batch_size: int):
    model = create_model(model_name, num_classes=NUM_CLASSES, image_size=res)
    config = engine_config(strategy, model.stage_names)
    config_lib.validate(config)
    params = model.variables["params"]
    batch_stats = model.variables.get("batch_stats", {})
    rules = optim.freeze_rules(config.strategy, model.stage_names, config.freeze_depth,
                               config.trainable)
    plan = optim.make_freeze_plan(params, model.stage_names, rules)
    tx = optim.make_optimizer(config, plan, params, optim.make_schedule(config, 1))
    # As in train_and_evaluate's phase_for_epoch.
    step = functools.partial(
        train.train_step, module=model.module, tx=tx, frozen_stages=plan.frozen_stages,
        num_classes=NUM_CLASSES, label_smoothing=config.label_smoothing, bf16=config.bf16,
        skip_nonfinite=config.nonfinite_policy == "skip",
        frozen_stats=plan.frozen_stats_mask(batch_stats))
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    step_fn = jax.jit(step, in_shardings=(replicated, data_sharding),
                      out_shardings=(replicated, replicated), donate_argnums=0)

    state = train.TrainState(step=np.int32(0), params=params, batch_stats=batch_stats,
                             opt_state=tx.init(params),
                             rng=np.asarray(jax.random.key_data(jax.random.PRNGKey(0))))
    self.state = jax.device_put(state, replicated)
    rng = np.random.default_rng(0)
    self.batch = jax.device_put(
        {"image": rng.standard_normal((batch_size, res, res, 3), np.float32),
         "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)}, data_sharding)
    start = time.perf_counter()
    self.compiled = step_fn.lower(self.state, self.batch).compile()
    self.compile_seconds = time.perf_counter() - start
    self.trainable_params = int(P.count({k: v for k, v in P.flatten(params).items()
                                         if plan.labels[k] != optim.FROZEN}))
    self.total_params = int(P.count(params))
    self.name = f"{model_name} {strategy}"

  def seconds_per_step(self, steps: int) -> float:
    """Median over `steps` steps after WARMUP_STEPS untimed ones (caches, allocator)."""
    times = []
    for _ in range(WARMUP_STEPS + steps):
      start = time.perf_counter()
      self.state, metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready((self.state, metrics))
      times.append(time.perf_counter() - start)
    if not bool(metrics["finite"]):
      raise FloatingPointError(f"{self.name}: non-finite loss in the timed steps")
    return statistics.median(times[WARMUP_STEPS:])


def find_torch() -> tuple[str | None, str | None, str]:
  """(python, yardstick path, why not) for the torch side; None where it is unavailable."""
  yardstick = os.path.abspath(os.environ.get("JTL_TORCH_YARDSTICK", DEFAULT_YARDSTICK))
  python = os.environ.get("JTL_TORCH_PYTHON") or (
      DEFAULT_TORCH_PYTHON if os.path.exists(DEFAULT_TORCH_PYTHON) else None)
  if python is None:
    return None, None, "no torch environment ($JTL_TORCH_PYTHON or /tmp/torchenv)"
  if not os.path.isfile(yardstick):
    return None, None, f"no yardstick at {yardstick} (set $JTL_TORCH_YARDSTICK)"
  return python, yardstick, ""


def torch_step_seconds(python: str, yardstick: str, model_name: str, strategy: str, res: int,
                       batch_size: int, steps: int) -> dict:
  """The yardstick's own step timing, in its own process."""
  command = [python, yardstick, "step", "--model", model_name, "--strategy", strategy,
             "--batch", str(batch_size), "--res", str(res), "--steps", str(steps)]
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode != 0:
    raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n"
                       + done.stderr[-2000:])
  result = json.loads(done.stdout.strip().splitlines()[-1])
  return {"s_per_step": result["s_per_step"], "threads": result.get("threads")}


class OtherJobs:
  """Cores' worth of CPU that other processes used while the block ran (None off Linux).

  The load average lags by a minute and counts the bench itself; the machine's busy time from
  /proc/stat minus this process's and its children's CPU time is what disturbed the timing.
  """

  def __enter__(self):
    self._start = self._snapshot()
    self.cores = None
    return self

  def __exit__(self, *exc):
    end = self._snapshot()
    if end[1] is not None and self._start[1] is not None:
      wall = end[0] - self._start[0]
      others = (end[1] - self._start[1]) - (end[2] - self._start[2])
      self.cores = max(others / wall, 0.0) if wall > 0 else None

  @staticmethod
  def _snapshot():
    own = sum(os.times()[:4])  # user and system, self and waited-for children
    try:
      with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
      return time.perf_counter(), None, own
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own


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


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _cores(value) -> str:
  return "n/a" if value is None else f"{value:.2f}"


def markdown_table(rows: list[dict]) -> str:
  lines = ["| model | strategy | res | jtl s/step | torch s/step | speed-up (torch/jtl) "
           "| load 1 min | other jobs (cores) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    speedup = "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}x"
    lines.append(f"| {r['model']} | {r['strategy']} | {r['res']} | {_seconds(r['jtl_s_per_step'])} "
                 f"| {_seconds(r['torch_s_per_step'])} | {speedup} | {r['load_1min']:.2f} "
                 f"| {_cores(r['other_jobs_cores'])} |")
  return "\n".join(lines)


def main(argv=None) -> int:
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
  parser.add_argument("--out", default=os.path.join(BENCH, "results.json"))
  args = parser.parse_args(argv)
  cases = parse_cases(args.cases) if args.cases else list(QUICK if args.quick else CASES)

  python, yardstick, why_not = (None, None, "--no-torch") if args.no_torch else find_torch()
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} devices), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start")
  print(f"torch yardstick: {yardstick} via {python}" if python
        else f"torch yardstick: not available ({why_not}); timing jtl only")

  rows, torch_threads = [], None
  for model_name, strategy, res in cases:
    loads = [os.getloadavg()[0]]
    jtl_runs, torch_runs = [], []  # (s/step, other jobs' cores) per round
    print(f"{model_name} {strategy} {res}px: compiling jtl's step ...", end="", flush=True)
    jtl_step = JtlStep(model_name, strategy, res, args.batch)
    print(f" {jtl_step.compile_seconds:.0f} s", flush=True)
    for _ in range(args.rounds):
      with OtherJobs() as others:
        seconds = jtl_step.seconds_per_step(args.steps)
      jtl_runs.append((seconds, others.cores))
      print(f"  jtl {seconds:.3f} s/step (other jobs {_cores(others.cores)} cores)", end="",
            flush=True)
      if python:
        try:
          with OtherJobs() as others:
            torch_result = torch_step_seconds(python, yardstick, model_name, strategy, res,
                                              args.batch, args.steps)
          torch_runs.append((torch_result["s_per_step"], others.cores))
          torch_threads = torch_result["threads"]
          print(f", torch {torch_runs[-1][0]:.3f} s/step (other jobs {_cores(others.cores)} "
                f"cores)", end="")
        except (RuntimeError, ValueError) as e:  # one broken case does not void the others
          print(f", torch failed: {e}", end="")
      loads.append(os.getloadavg()[0])
      print(f"; load {loads[-1]:.2f}", flush=True)
    # Other jobs only ever slow a side down: its fastest round is the least disturbed one.
    jtl_best = min(jtl_runs)
    torch_best = min(torch_runs) if torch_runs else None
    disturbance = [c for c in (jtl_best[1], torch_best[1] if torch_best else None)
                   if c is not None]
    rows.append({"model": model_name, "strategy": strategy, "res": res,
                 "jtl_s_per_step": jtl_best[0], "torch_s_per_step": torch_best and torch_best[0],
                 "speedup": torch_best[0] / jtl_best[0] if torch_best else None,
                 "load_1min": max(loads),
                 "other_jobs_cores": max(disturbance) if disturbance else None,
                 "jtl_rounds": jtl_runs, "torch_rounds": torch_runs,
                 "jtl_compile_s": round(jtl_step.compile_seconds, 1),
                 "trainable_params": jtl_step.trainable_params,
                 "total_params": jtl_step.total_params})
    del jtl_step  # frees its buffers before the next case compiles

  table = markdown_table(rows)
  load_end = os.getloadavg()
  print()
  print(table)
  print(f"\nbatch {args.batch}, median of {args.steps} steps after {WARMUP_STEPS} warm-up steps, "
        f"best of {args.rounds} round(s); "
        f"load average at the end {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f} "
        f"(1 / 5 / 15 min)")
  results = {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": {"platform": platform.platform(), "processor": _cpu_model(),
                  "cpus": os.cpu_count(), "jax": jax.__version__,
                  "backend": jax.default_backend(), "devices": jax.device_count(),
                  "torch_threads": torch_threads},
      "batch": args.batch, "timed_steps": args.steps, "warmup_steps": WARMUP_STEPS,
      "rounds": args.rounds,
      "torch": python is not None, "load_average_end": list(load_end), "cases": rows}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
