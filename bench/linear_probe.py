"""How close jtl's default feature extraction gets to a correct linear probe, on small real folders.

  .venv/bin/python bench/linear_probe.py                      # every folder of small_folders.py
  .venv/bin/python bench/linear_probe.py --folders digits --no-jtl
  .venv/bin/python bench/linear_probe.py --configs plain --set probe.solver=sgd  # the loop

The reference probe: the backbone of efficientnet_lite0 with its shipped weights in inference
mode (`jtl.steps.make_features_fn` up to the head, then the head's own global average pool) on
the evaluation transform at 128 px, and a multinomial logistic regression fitted to convergence
on those features (scikit-learn, lbfgs, C picked by 5-fold stratified cross-validation on the
training split from a small grid). Same model class as jtl's head (one dense layer on the
pooled features), fitted as well as it can be: what feature extraction should reach.

Beside it, jtl as a user runs it: `python -m jtl.main --config configs/feature_extraction.py`
(the demo-data defaults) and `...:photos` (the defaults for a folder of photos), with only
`dataset` and `image_size=128` set; each run reports its test accuracy, training seconds
(`train_seconds`: the loop, or the linear probe's solve, after the feature cache is built), the
way the head was fitted (`head_solver`: lbfgs or sgd) and the process's wall time. `--set
KEY=VALUE` adds config overrides to every jtl run.
Results go to the "linear_probe" key of bench/results.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, REPO)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import machine  # noqa: E402
import small_folders  # noqa: E402
from jtl_run import run_main  # noqa: E402

MODEL = "efficientnet_lite0"
RES = 128
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
FOLDS = 5
MAX_ITER = 20000
CONFIGS = {"plain": "configs/feature_extraction.py",
           "photos": "configs/feature_extraction.py:photos"}


def pooled_features(root: str, res: int = RES) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (features [N, C], labels [N])}: the backbone's last stage in inference mode,
  averaged over space as the head does (models/efficientnet.py: mean over H, W)."""
  import jax.numpy as jnp
  from jtl import data as data_lib
  from jtl import distributed, steps
  from jtl.models import create_model
  dataset = data_lib.open_dataset(f"folder:{root}", val_fraction=0.0)
  model = create_model(MODEL, num_classes=dataset.num_classes, pretrained=True, image_size=res)
  preprocess = data_lib.Preprocess.from_pretrained_cfg(model.pretrained_cfg, res)
  mesh = distributed.make_mesh()
  features = steps.make_features_fn(model, mesh, stop_stage=len(model.stage_names) - 1)
  variables = distributed.replicate(
      (model.variables["params"], model.variables.get("batch_stats", {})), mesh)
  out = {}
  for split in ("train", "test"):
    xs, ys = [], []
    for batch in data_lib.eval_batches(dataset, split, batch_size=128, preprocess=preprocess):
      images = distributed.global_batch({"image": batch["image"]}, mesh)["image"]
      pooled = np.asarray(jnp.mean(features(*variables, images), axis=(1, 2)))
      xs.append(pooled[batch["mask"]])
      ys.append(batch["label"][batch["mask"]])
    out[split] = (np.concatenate(xs), np.concatenate(ys))
  return out


def fit_probe(train: tuple, test: tuple, seed: int = 0) -> dict:
  """Logistic regression with C cross-validated on train; its test accuracy."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import GridSearchCV, StratifiedKFold
  from threadpoolctl import threadpool_limits
  start = time.perf_counter()
  search = GridSearchCV(LogisticRegression(solver="lbfgs", max_iter=MAX_ITER),
                        {"C": list(C_GRID)},
                        cv=StratifiedKFold(FOLDS, shuffle=True, random_state=seed))
  # One BLAS thread: with two on a busy 2-core machine every lbfgs iteration took 30x longer
  # (threads waiting on each other), and the products here are small.
  with threadpool_limits(limits=1):
    search.fit(*train)
  best = search.best_estimator_
  n_iter = int(np.max(best.n_iter_))
  with threadpool_limits(limits=1):
    test_accuracy = float(best.score(*test))
  return {"test_accuracy": test_accuracy, "C": float(search.best_params_["C"]),
          "cv_accuracy": float(search.best_score_),
          "cv_by_C": dict(zip(map(str, C_GRID), map(float, search.cv_results_["mean_test_score"]))),
          "n_iter": n_iter, "converged": n_iter < MAX_ITER,
          "fit_seconds": time.perf_counter() - start}


def jtl_runs(root: str, work: str, names, overrides: dict) -> dict:
  runs = {}
  for name in names:
    load = machine.load_1min()
    with machine.OtherJobs() as others:
      result = run_main(CONFIGS[name], os.path.join(work, name),
                        {"dataset": f"folder:{root}", "image_size": RES, **overrides})
    runs[name] = {**result, "load_1min": max(load, machine.load_1min()),
                  "other_jobs_cores": others.cores}
    print(f"  jtl {name}: test accuracy {result['test_accuracy']:.4f}, train "
          f"{result['train_seconds']:.1f} s, wall {result['wall_s']:.1f} s, "
          f"{result['steps']} steps ({result.get('head_solver')}), load "
          f"{runs[name]['load_1min']:.2f}", flush=True)
  return runs


def folder_case(name: str, args) -> dict:
  folder = small_folders.build(name, args.folders_dir)
  load = machine.load_1min()
  split_features = pooled_features(folder["root"])
  probe = fit_probe(split_features["train"], split_features["test"])
  probe.update(load_1min=max(load, machine.load_1min()),
               feature_dim=int(split_features["train"][0].shape[1]))
  print(f"{name}: probe test accuracy {probe['test_accuracy']:.4f} (C={probe['C']:g}, "
        f"{probe['n_iter']} iterations, cv {probe['cv_accuracy']:.4f})", flush=True)
  runs = {} if args.no_jtl else jtl_runs(folder["root"], os.path.join(args.work, name),
                                         args.configs, args.set)
  return {"folder": folder, "probe": probe, "jtl": runs}


def markdown_table(cases: dict) -> str:
  lines = ["| folder | train / test | run | test accuracy | vs probe (points) | train s "
           "| wall s | steps | head fit | load 1 min | other jobs (cores) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, case in cases.items():
    counts = case["folder"]["counts"]
    size = f"{sum(counts['train'])} / {sum(counts['test'])}"
    probe = case["probe"]
    lines.append(f"| {name} | {size} | probe (C={probe['C']:g}) "
                 f"| {100 * probe['test_accuracy']:.1f}% | - | {probe['fit_seconds']:.1f} | - "
                 f"| - | sklearn | {probe['load_1min']:.2f} | - |")
    for run, r in case["jtl"].items():
      delta = 100 * (r["test_accuracy"] - probe["test_accuracy"])
      lines.append(f"| {name} | {size} | jtl {run} | {100 * r['test_accuracy']:.1f}% "
                   f"| {delta:+.1f} | {r['train_seconds']:.1f} | {r['wall_s']:.1f} "
                   f"| {r['steps']} | {r.get('head_solver') or '-'} | {r['load_1min']:.2f} "
                   f"| {machine.cores(r['other_jobs_cores'])} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--folders", default=",".join(small_folders.SOURCES),
                      help="comma-separated: " + ", ".join(small_folders.SOURCES))
  parser.add_argument("--configs", default=",".join(CONFIGS), help="jtl configs to run: "
                      + ", ".join(f"{k} ({v})" for k, v in CONFIGS.items()))
  parser.add_argument("--no-jtl", action="store_true", help="the probe only")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for every jtl run (repeatable)")
  parser.add_argument("--work", default=os.path.join(REPO, "runs", "bench", "probe"))
  parser.add_argument("--folders-dir", default=os.path.join(REPO, "runs", "bench", "small"))
  parser.add_argument("--out", default=machine.RESULTS)
  args = parser.parse_args(argv)
  args.configs = [c for c in args.configs.split(",") if c]
  args.set = dict(item.split("=", 1) for item in args.set)
  args.work, args.folders_dir = os.path.abspath(args.work), os.path.abspath(args.folders_dir)
  print(f"{machine.load_line()} at the start", flush=True)
  cases = {name: folder_case(name, args) for name in args.folders.split(",") if name}
  print()
  print(markdown_table(cases))
  print(f"\n{machine.load_line()} at the end")
  machine.update_results({"linear_probe": {
      "date": machine.now(), "machine": machine.describe(), "model": MODEL, "res": RES,
      "c_grid": list(C_GRID), "folds": FOLDS, "load_average_end": list(os.getloadavg()),
      "overrides": args.set,
      "cases": cases}}, args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
