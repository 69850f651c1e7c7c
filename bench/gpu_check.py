"""On a machine with a GPU (or TPU): training-step speed of ResNet-50 and ViT-B/16 (full
fine-tuning, bf16, batch 128, 224 px) and whether jtl's input pipeline keeps up with them on
that machine's cores. One prepared script, to run once where an accelerator is lent:

  .venv/bin/python bench/gpu_check.py [--out DIR]     # writes DIR/gpu_check.json (default bench/)

The input side is bench/input_pipeline.py's: scikit-image photos as JPEGs of mixed sizes,
converted to records, decoded + random-resized-crop + flip at 224 px on every core, read by
index as a run on records:DIR reads them. "Keeps up" means the pipeline's images/s is at least
the step's images/s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import jax  # noqa: E402

import input_pipeline  # noqa: E402
import jtl_step  # noqa: E402
import machine  # noqa: E402
from jtl.models import create_model  # noqa: E402

CASES = (("resnet50", 224), ("vit_base_patch16_224", 224))
BATCH = 128


def step_images_per_s(name: str, res: int) -> dict:
  model = create_model(name, num_classes=jtl_step.NUM_CLASSES, image_size=res)
  step = jtl_step.JtlStep(model, 0, res, BATCH, bf16=True)
  seconds = step.seconds_per_step(20, warmup=3)
  return {"model": name, "res": res, "batch": BATCH, "dtype": "bfloat16",
          "s_per_step": seconds, "images_per_s": BATCH / seconds,
          "compile_s": step.compile_seconds}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=BENCH)
  parser.add_argument("--images", type=int, default=4096)
  args = parser.parse_args(argv)
  result = {"date": machine.now(), "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind, "cpu": machine.cpu_model(),
            "cores": os.cpu_count(), "steps": [step_images_per_s(*c) for c in CASES]}
  input_pipeline.write_photos()
  if not os.path.isdir(input_pipeline.RECORDS):
    from jtl.data import convert
    convert.convert(f"folder:{input_pipeline.PHOTOS}", input_pipeline.RECORDS,
                    show_progress=False)
  rate = input_pipeline.run_side("records", args.images, None)
  result["input_images_per_s"] = rate
  for case in result["steps"]:
    case["input_keeps_up"] = rate >= case["images_per_s"]
    print(f"{case['model']}: {case['images_per_s']:.0f} images/s a step "
          f"({case['s_per_step'] * 1000:.1f} ms); input {rate:.0f} images/s on "
          f"{os.cpu_count()} cores: {'keeps up' if case['input_keeps_up'] else 'does NOT keep up'}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
    json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
