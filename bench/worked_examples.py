"""The README's worked examples (a frozen DINOv2 probe, a SigLIP partial fine-tune, a ConvNeXt
full fine-tune), run as written through their hub ids, offline.

  .venv/bin/python bench/worked_examples.py --torch-python /tmp/torchenv/bin/python

This machine cannot reach the Hugging Face hub, so the hub files the commands download are
stood in for: the PyTorch environment (timm) writes each default tag's model with random
weights, at its real size and under timm's names, as model.safetensors into a huggingface_hub
cache laid out as a download leaves it; the commands then run with HF_HUB_OFFLINE=1 and that
cache. What this measures is that each command works end to end from a hub id (resolution,
conversion, the run, its export) and what it costs on this machine; accuracy with random
weights means nothing and is not reported. The data is scikit-image's 200 LFW crops
(bench/small_folders.py) and every run is capped at --train-steps optimizer steps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)

# name in the README command, the timm model + tag its default weights come from, and the
# command's own arguments after --workdir.
EXAMPLES = (
    ("dinov2_probe", "vit_small_patch14_dinov2.lvd142m",
     ["--config", "configs/feature_extraction.py", "--config.model=vit_small_patch14_dinov2",
      "--config.image_size=224"]),
    ("siglip_partial", "vit_base_patch16_siglip_224.v2_webli",
     ["--config", "configs/partial_ft.py", "--config.model=vit_base_patch16_siglip_224",
      "--config.freeze_depth=9"]),
    ("convnext_full", "convnext_tiny.in12k_ft_in1k",
     ["--config", "configs/full_ft.py", "--config.model=convnext_tiny"]),
)

# Runs in the PyTorch environment: the stand-in of one timm hub repository.
_WRITE_STANDIN = """
import sys, timm, torch
from safetensors.torch import save_file
torch.manual_seed(0)
model = timm.create_model(sys.argv[1], pretrained=False)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
"""


def write_standin(torch_python: str, timm_tag: str, hub_cache: str) -> str:
  """timm/<tag>'s model.safetensors (random weights) in huggingface_hub's cache layout."""
  repo_dir = os.path.join(hub_cache, f"models--timm--{timm_tag}")
  revision = "0" * 40
  snapshot = os.path.join(repo_dir, "snapshots", revision)
  os.makedirs(snapshot, exist_ok=True)
  os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
  with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
    f.write(revision)
  path = os.path.join(snapshot, "model.safetensors")
  if not os.path.exists(path):
    subprocess.run([torch_python, "-c", _WRITE_STANDIN, timm_tag, path], check=True)
  return path


def run_example(name: str, args: list[str], *, data: str, out: str, train_steps: int,
                env: dict) -> dict:
  workdir = os.path.join(out, name)
  command = [sys.executable, "-m", "jtl.main", *args, "--workdir", workdir,
             f"--config.dataset=folder:{data}", f"--config.train_steps={train_steps}",
             "--config.progress_bar=False"]
  started = time.perf_counter()
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - started
  if done.returncode:
    sys.stderr.write(done.stderr[-4000:])
    return {"command": " ".join(command[1:]), "returncode": done.returncode,
            "wall_seconds": round(wall, 1)}
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    final = json.load(f)
  keys = ("trainable_params", "total_params", "steps", "train_seconds", "step_seconds",
          "feature_cache", "feature_cache_seconds", "head_solver", "num_test_examples")
  return {"command": " ".join(command[1:]), "returncode": 0, "wall_seconds": round(wall, 1),
          **{k: final[k] for k in keys if k in final},
          "exported": os.path.isfile(os.path.join(workdir, "export", "model.safetensors"))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--torch-python", required=True, help="python of the PyTorch environment")
  parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench", "worked"))
  parser.add_argument("--train-steps", type=int, default=20)
  parser.add_argument("--only", default="", help="comma-separated example names")
  args = parser.parse_args()
  sys.path.insert(0, BENCH)
  import small_folders
  data = small_folders.build("lfw_faces", os.path.join(ROOT, "runs", "bench", "small"), 0)["root"]
  hub_cache = os.path.join(args.out, "hub")
  env = dict(os.environ, HF_HUB_CACHE=hub_cache, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2",
             JTL_CACHE_DIR=tempfile.mkdtemp(prefix="jtl-worked-cache-"))
  only = set(filter(None, args.only.split(",")))
  results = {}
  for name, timm_tag, command in EXAMPLES:
    if only and name not in only:
      continue
    write_standin(args.torch_python, timm_tag, hub_cache)
    results[name] = run_example(name, command, data=data, out=args.out,
                                train_steps=args.train_steps, env=env)
    print(name, json.dumps(results[name], indent=1), flush=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
