"""A whole training run, start-up included, jtl next to the PyTorch yardstick on one folder.

  .venv/bin/python bench/whole_run.py                 # one round of every run
  .venv/bin/python bench/whole_run.py --rounds 2      # alternated twice, every round shown

The folder: the demo data (`python -m jtl.data.demo`, from the Fashion-MNIST files Debian
ships) cut to a seeded, stratified 2,000 training and 1,000 test images, the yardstick
README's whole-run case. The runs, alternated in each round:
  torch       seed_torch_loop.py run --model efficientnet_lite0 --strategy feature --res 128
              --epochs 10 (its whole loop: 2,000 images, batch 32, Adam 1e-3)
  jtl         python -m jtl.main --config configs/feature_extraction.py, with only the dataset
              and image_size=128 set: the config's own budget
  jtl 10 ep   the same with num_epochs=10, the yardstick's epochs
Wall time is each process's, start to exit; jtl's runs start from an empty feature cache.
Ratios jtl/torch of one round are the figures; each round shows its load and other jobs' CPU.
Results go to the "whole_run" key of bench/results.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

import numpy as np  # noqa: E402

import machine  # noqa: E402
from jtl_run import run_main  # noqa: E402
from yardstick import Yardstick  # noqa: E402

FASHION_FILES = "/usr/share/datasets/fashion-mnist"
PER_CLASS = {"train": 200, "test": 100}  # 10 classes: 2,000 and 1,000 images
RES = 128
EPOCHS = 10
CONFIG = "configs/feature_extraction.py"


def demo_folder(out: str) -> str:
  """The full demo folder, written by the project's own converter (idempotent)."""
  if not os.path.isfile(os.path.join(FASHION_FILES, "train-images-idx3-ubyte.gz")):
    raise SystemExit(f"no Fashion-MNIST files in {FASHION_FILES}: run `make demo-data` "
                     "(installs Debian's dataset-fashion-mnist)")
  out = os.path.abspath(out)  # the converter runs in the repository
  subprocess.run([sys.executable, "-m", "jtl.data.demo", "--out", out], cwd=REPO, check=True)
  return out


def stratified_subset(source: str, out: str, per_class: dict, seed: int = 0) -> str:
  """out/<split>/<class>/ holding per_class[split] files of each class, drawn seeded."""
  marker = os.path.join(out, ".bench_subset.txt")
  wanted = f"{os.path.abspath(source)} {sorted(per_class.items())} seed {seed}"
  if os.path.isfile(marker) and open(marker).read() == wanted:
    return out
  shutil.rmtree(out, ignore_errors=True)
  rng = np.random.default_rng(seed)
  for split, count in per_class.items():
    for name in sorted(os.listdir(os.path.join(source, split))):
      files = sorted(os.listdir(os.path.join(source, split, name)))
      os.makedirs(os.path.join(out, split, name))
      for f in rng.choice(files, count, replace=False):
        shutil.copy(os.path.join(source, split, name, f), os.path.join(out, split, name, f))
  with open(marker, "w") as f:
    f.write(wanted)
  return out


def _timed(what: str, fn) -> dict:
  load = machine.load_1min()
  with machine.OtherJobs() as others:
    result = fn()
  result.update(run=what, load_1min=max(load, machine.load_1min()),
                other_jobs_cores=others.cores)
  print(f"  {what}: {result['wall_s']:.1f} s wall, test accuracy "
        f"{result['test_accuracy']:.4f}, load {result['load_1min']:.2f}, other jobs "
        f"{machine.cores(others.cores)} cores", flush=True)
  return result


def one_round(data: str, work: str, torch: Yardstick | None) -> list[dict]:
  overrides = {"dataset": f"folder:{data}", "image_size": RES}
  runs = [("jtl", lambda: run_main(CONFIG, os.path.join(work, "jtl"), overrides)),
          (f"jtl {EPOCHS} ep", lambda: run_main(CONFIG, os.path.join(work, "jtl10"),
                                                {**overrides, "num_epochs": EPOCHS}))]
  if torch:
    runs.insert(1, ("torch", lambda: torch.whole_run("efficientnet_lite0", "feature", data,
                                                     RES, EPOCHS)))
  return [_timed(what, fn) for what, fn in runs]


def markdown_table(rounds: list[list[dict]]) -> str:
  lines = ["| round | run | epochs | steps | wall s | jtl/torch wall | test accuracy "
           "| train s | load 1 min | other jobs (cores) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for i, runs in enumerate(rounds, 1):
    torch = next((r for r in runs if r["run"] == "torch"), None)
    for r in runs:
      ratio = (f"{r['wall_s'] / torch['wall_s']:.3f}" if torch and r is not torch else "-")
      steps = r.get("steps") or "-"
      epochs = EPOCHS if r["run"] != "jtl" else "config"
      train = "-" if r.get("train_seconds") is None else f"{r['train_seconds']:.1f}"
      lines.append(f"| {i} | {r['run']} | {epochs} | {steps} | {r['wall_s']:.1f} | {ratio} "
                   f"| {100 * r['test_accuracy']:.1f}% | {train} | {r['load_1min']:.2f} "
                   f"| {machine.cores(r['other_jobs_cores'])} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--work", default=os.path.join(REPO, "runs", "bench"),
                      help="folders and workdirs (default runs/bench)")
  parser.add_argument("--demo", default=os.path.join(REPO, "data", "fashion_mnist"),
                      help="the full demo folder (written when missing)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--out", default=machine.RESULTS)
  args = parser.parse_args(argv)
  work = os.path.abspath(args.work)
  data = stratified_subset(demo_folder(args.demo), os.path.join(work, "fashion_2000"),
                           PER_CLASS)
  torch, why_not = (None, "--no-torch") if args.no_torch else Yardstick.find()
  print(f"{data}; torch yardstick: {torch or 'not available (' + why_not + ')'}; "
        f"{machine.load_line()} at the start", flush=True)
  rounds = []
  for i in range(args.rounds):
    print(f"round {i + 1}", flush=True)
    rounds.append(one_round(data, os.path.join(work, "whole"), torch))
  print()
  print(markdown_table(rounds))
  print(f"\n{machine.load_line()} at the end")
  machine.update_results({"whole_run": {
      "date": machine.now(), "machine": machine.describe(), "data": data,
      "per_class": PER_CLASS, "res": RES, "epochs": EPOCHS, "config": CONFIG,
      "load_average_end": list(os.getloadavg()), "rounds": rounds}}, args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
