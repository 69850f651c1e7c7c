"""Input-pipeline speed: jtl's training input next to torchvision's DataLoader, and streaming
from records next to the in-memory path, on the same files and cores in one run.

  .venv/bin/python bench/input_pipeline.py [--rounds 3] [--images 640]

The corpus: scikit-image's sample photographs (astronaut, coffee, chelsea, rocket, ...) saved as
JPEGs at several sizes (0.6x to 1.6x) and qualities (70 to 95), in two class folders under
runs/bench/input_photos, and the same folder converted by `jtl convert`. Every side runs the
training transform at 224 px: decode, random-resized-crop (scale 0.08-1, ratio 3/4-4/3),
horizontal flip, normalise, batches of 32, on every core of the machine:

  folder   jtl, reading and decoding the files each step (no decoded cache)
  memory   jtl, the encoded bytes held in memory (what a small tfds dataset gets)
  records  jtl, records:DIR read by index by the background reader
  torch    torchvision ImageFolder + DataLoader(num_workers = cores) with the same transforms,
           in the yardstick's torch environment ($JTL_TORCH_PYTHON, else /tmp/torchenv)

Each side is a fresh process (python bench/input_pipeline.py side NAME) that takes one warm-up
pass and then times --images images; the sides alternate for --rounds rounds and each keeps its
median. Images/s per core divides by the cores every side was given (all of them).

  --rss    also: peak anonymous memory (RssAnon) of 200 training steps on 20,000 and on
           200,000 synthetic JPEG records (the memory a run needs must not grow with the data),
           and the time to open each
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, REPO)

import machine  # noqa: E402
from yardstick import Yardstick  # noqa: E402

WORK = os.path.join(REPO, "runs", "bench")
PHOTOS = os.path.join(WORK, "input_photos")
RECORDS = os.path.join(WORK, "input_records")
SIZE, BATCH = 224, 32
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
SCALES = (0.6, 1.0, 1.6)
QUALITIES = (70, 85, 95)


def write_photos(root: str = PHOTOS, copies: int = 4) -> str:
  """scikit-image's photos at several sizes and qualities: real JPEG statistics, mixed sizes."""
  if os.path.isdir(root):
    return root
  import numpy as np
  from PIL import Image
  from skimage import data as skdata
  tmp = root + ".tmp"
  count = 0
  for copy in range(copies):
    for name in PHOTO_NAMES:
      pixels = np.asarray(getattr(skdata, name)())[..., :3]
      img = Image.fromarray(pixels)
      for scale in SCALES:
        for quality in QUALITIES:
          size = (max(1, int(img.width * scale)), max(1, int(img.height * scale)))
          folder = os.path.join(tmp, f"class_{count % 2}")
          os.makedirs(folder, exist_ok=True)
          img.resize(size, Image.BICUBIC).save(
              os.path.join(folder, f"{name}_{scale}_{quality}_{copy}.jpg"), quality=quality)
          count += 1
  os.rename(tmp, root)
  return root


# ---------------------------------------------------------------------------------------------
# One side, in its own process.

def _jtl_dataset(kind: str):
  from jtl import data
  options = data.DecodeOptions(cache_decoded=False)
  if kind == "records":
    return data.open_dataset(f"records:{RECORDS}", val_fraction=0, options=options)
  ds = data.open_dataset(f"folder:{PHOTOS}", val_fraction=0, options=options)
  if kind == "memory":  # the encoded bytes in memory, as the tfds path holds them
    import dataclasses
    import numpy as np
    table = ds.table("train")
    encoded = np.empty(len(table), object)
    for i, path in enumerate(table.sources):
      with open(path, "rb") as f:
        encoded[i] = f.read()
    ds = data.Dataset(ds.name, ds.class_names,
                      {"train": dataclasses.replace(table, sources=encoded, from_files=False)},
                      cache_decoded=False)
  return ds


def jtl_side(kind: str, images: int) -> float:
  from jtl import data
  ds = _jtl_dataset(kind)
  pp = data.Preprocess(image_size=SIZE)
  augment = data.Augment(random_resized_crop=True, hflip=True)
  per_epoch = ds.num_examples("train") // BATCH

  def batches():
    epoch = 0
    while True:
      yield from data.train_batches(ds, batch_size=BATCH, preprocess=pp, augment=augment,
                                    seed=0, epoch=epoch)
      epoch += 1
  it = batches()
  for _ in range(per_epoch):  # warm-up: tracing, thread pools, page cache
    next(it)
  start, seen = time.perf_counter(), 0
  while seen < images:
    seen += len(next(it)["label"])
  return seen / (time.perf_counter() - start)


TORCH_SIDE = r"""
import sys, time, torch, torchvision.transforms as T
from torchvision.datasets import ImageFolder
from torch.utils.data import DataLoader
root, images, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                       T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
loader = DataLoader(ImageFolder(root, transform), batch_size=32, shuffle=True, drop_last=True,
                    num_workers=workers, persistent_workers=True)
def batches():
  while True:
    yield from loader
it = batches()
for _ in range(len(loader)):
  next(it)
start, seen = time.perf_counter(), 0
while seen < images:
  seen += len(next(it)[1])
print(seen / (time.perf_counter() - start))
"""


def run_side(name: str, images: int, yardstick) -> float | None:
  cores = os.cpu_count() or 1
  if name == "torch":
    if yardstick is None:
      return None
    out = subprocess.run([yardstick.python, "-c", TORCH_SIDE, PHOTOS, str(images), str(cores)],
                         check=True, capture_output=True, text=True).stdout
  else:
    out = subprocess.run([sys.executable, __file__, "side", name, "--images", str(images)],
                         check=True, capture_output=True, text=True).stdout
  return float(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Peak anonymous memory of training on many records.

def write_synthetic_records(root: str, count: int) -> str:
  """`count` 32x32 JPEG records in 10 classes, written through jtl's record format directly
  (the conversion is not what is measured; 64 distinct images repeat)."""
  if os.path.isfile(os.path.join(root, "manifest.json")):
    return root
  import uuid
  import numpy as np
  from PIL import Image
  from array_record.python import array_record_module
  from jtl.data import decode, record_format
  rng = np.random.default_rng(0)
  encoded = []
  for _ in range(64):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(buffer, "JPEG",
                                                                      quality=90)
    encoded.append(buffer.getvalue())
  tmp = root + ".tmp"
  os.makedirs(tmp, exist_ok=True)
  per_shard, shards = 10_000, []
  count_shards = -(-count // per_shard)
  labels = np.arange(count, dtype=np.int32) % 10
  for s in range(count_shards):
    path = os.path.join(tmp, record_format.shard_name("train", s, count_shards))
    writer = array_record_module.ArrayRecordWriter(path, record_format.WRITER_OPTIONS)
    ids = range(s * per_shard, min(count, (s + 1) * per_shard))
    for i in ids:
      writer.write(record_format.encode_record(encoded[i % 64], int(labels[i]),
                                               decode.KIND_JPEG, 1, 32, 32))
    writer.close()
    shards.append(record_format.Shard(path, len(ids), os.path.getsize(path),
                                      record_format.edge_digest(path)))
  record_format.write_columns(os.path.join(tmp, record_format.columns_name("train")), {
      "labels": labels, "kinds": np.full(count, decode.KIND_JPEG, np.int8),
      "orientations": np.ones(count, np.int8), "heights": np.full(count, 32, np.int32),
      "widths": np.full(count, 32, np.int32)})
  record_format.write_manifest(tmp, source="synthetic", conversion_id=uuid.uuid4().hex,
                               class_names=[f"c{i}" for i in range(10)],
                               splits={"train": shards}, bad_images={})
  os.rename(tmp, root)
  return root


def _rss_anon_kib(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("RssAnon:"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


RSS_STEPS = 200


def train_steps(records: str, workdir: str, steps: int = RSS_STEPS) -> None:
  """The engine on `records` (full fine-tuning of a random EfficientNet-Lite0 at 64 px, batch
  32), stopped after `steps` steps as a preemption stops it (a budget is whole epochs, and an
  epoch of 200,000 records is 6,250 steps)."""
  from jtl import config as config_lib, train
  from jtl.loop import Hook

  class StopAfter(Hook):
    def after_step(self, loop, step):
      if step >= steps:
        loop.interrupt()
  c = config_lib.default_config()
  c.dataset, c.model, c.pretrained, c.image_size = f"records:{records}", "efficientnet_lite0", \
      "none", 64
  c.strategy, c.batch_size, c.val_fraction, c.progress_bar = "full", 32, 0.0, False
  train.train_and_evaluate(c, workdir, extra_hooks=[StopAfter()])


def peak_rss_of_training(records: str, workdir: str) -> dict:
  """Peak RssAnon (MiB) of RSS_STEPS training steps on `records` (polled every 0.1 s)."""
  import shutil
  shutil.rmtree(workdir, ignore_errors=True)
  command = [sys.executable, __file__, "train", "--records", records, "--workdir", workdir]
  start = time.perf_counter()
  log_path = workdir + ".log"
  with open(log_path, "w") as log:
    child = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    peak = 0
    while child.poll() is None:
      peak = max(peak, _rss_anon_kib(child.pid))
      time.sleep(0.1)
  if child.returncode:
    with open(log_path) as f:
      raise RuntimeError(f"training on {records} failed:\n{f.read()[-3000:]}")
  return {"peak_rss_anon_mib": peak / 1024, "seconds": time.perf_counter() - start}


def rss_case() -> dict:
  results = {}
  for count in (20_000, 200_000):
    records = write_synthetic_records(os.path.join(WORK, f"synthetic_records_{count}"), count)
    from jtl import data
    start = time.perf_counter()
    data.open_dataset(f"records:{records}", val_fraction=0.1)  # manifest, columns, carve
    opened = time.perf_counter() - start
    results[str(count)] = peak_rss_of_training(records, os.path.join(WORK, f"rss_run_{count}"))
    results[str(count)]["open_seconds"] = opened
    print(f"{count:>7,d} records: peak RssAnon {results[str(count)]['peak_rss_anon_mib']:.0f} "
          f"MiB ({results[str(count)]['seconds']:.0f} s; opened in {opened:.2f} s)", flush=True)
  results["ratio_200k_to_20k"] = (results["200000"]["peak_rss_anon_mib"]
                                  / results["20000"]["peak_rss_anon_mib"])
  return results


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "side", "train"])
  parser.add_argument("name", nargs="?", choices=["folder", "memory", "records"])
  parser.add_argument("--images", type=int, default=640)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--rss", action="store_true")
  parser.add_argument("--records")
  parser.add_argument("--workdir")
  args = parser.parse_args(argv)
  if args.mode == "side":
    print(jtl_side(args.name, args.images))
    return 0
  if args.mode == "train":
    train_steps(args.records, args.workdir)
    return 0

  write_photos()
  if not os.path.isdir(RECORDS):
    from jtl.data import convert
    convert.convert(f"folder:{PHOTOS}", RECORDS, show_progress=False)
  yardstick, why = Yardstick.find()
  print(f"torch DataLoader: {yardstick or 'not available: ' + why}")
  sides = ("folder", "memory", "records", "torch")
  rates = {s: [] for s in sides}
  with machine.OtherJobs() as others:
    for r in range(args.rounds):
      for side in sides:
        rate = run_side(side, args.images, yardstick)
        if rate is not None:
          rates[side].append(rate)
        print(f"round {r + 1}: {side:8s} {rate if rate is None else f'{rate:.1f}'} images/s",
              flush=True)
  cores = os.cpu_count() or 1
  median = {s: statistics.median(v) if v else None for s, v in rates.items()}
  result = {
      "date": machine.now(), "cores": cores, "cpu": machine.cpu_model(),
      "load": machine.load_line(), "other_jobs_cores": others.cores, "rounds": args.rounds,
      "images_per_round": args.images, "size": SIZE, "batch": BATCH,
      "images_per_s": median, "rounds_images_per_s": rates,
      "images_per_s_per_core": {s: (v / cores if v else None) for s, v in median.items()},
      "records_vs_memory": median["records"] / median["memory"],
      "jtl_folder_vs_torch": (median["folder"] / median["torch"]) if median["torch"] else None,
  }
  print(json.dumps({k: result[k] for k in ("images_per_s_per_core", "records_vs_memory",
                                           "jtl_folder_vs_torch", "load")}, indent=1))
  if args.rss:
    result["rss"] = rss_case()
  machine.update_results({"input_pipeline": result})
  return 0


if __name__ == "__main__":
  sys.exit(main())
