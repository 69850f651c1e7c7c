"""Defaults every experiment shares: all keys, each with a comment, live in jtl/config.py.

Command-line overrides look like --config.optimizer.lr=3e-4 or --config.model=resnet50.
`demo_data()` sets what suits the offline demo (Fashion-MNIST, 28 px grey images) and
`photo_data()` what suits photos of ordinary size; each config file picks one by its argument
(`--config configs/partial_ft.py` is the demo, `--config configs/partial_ft.py:photos` photos).
"""
import ml_collections

from jtl.config import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  # The budget rule (jtl/budget.py), one for 140 images and for 60,000: num_epochs epochs, but
  # never fewer than min_train_steps optimizer steps (a small folder gets enough steps to fit
  # its head), at most max_evaluations evaluations and checkpoints over the run (a 2-step epoch
  # is not worth one each), and early stopping on the validation split after `patience`
  # evaluations without improvement. With the frozen prefix cached (feature extraction and
  # partial fine-tuning without random augmentation) a step on 140 images costs milliseconds.
  c.min_train_steps = 500
  c.max_evaluations = 20
  c.early_stopping.patience = 5
  # An evaluation checkpoints only when a minute has passed since the last checkpoint (the end
  # of the run and SIGTERM always do; a better model meanwhile is held in memory and written
  # with the next one): Orbax takes ~0.8 s per save of EfficientNet-Lite0, which was 12 of the
  # 22 s of training of a 1,200-image folder on cached features.
  c.checkpoint_min_seconds = 60.0
  return c


def demo_data(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fashion-MNIST from `make demo-data`, sized to train in minutes on a 2-core CPU."""
  c.dataset = "folder:data/fashion_mnist"
  c.image_size = 64                 # 28 px originals upscaled; 224 px costs 12x the compute
  c.max_train_examples = 20000      # stratified subset of the 57,000 left after val
  c.val_fraction = 0.05             # 3,000 validation images carved from train
  c.augment.random_resized_crop = False  # crops of 28 px garments lose the garment
  c.augment.hflip = True
  c.batch_size = 64
  c.num_epochs = 2                  # about 3 minutes on a 2-core CPU
  c.schedule.warmup_epochs = 0.2
  return c


def photo_data(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Your own photos: folder:PATH at the weights' resolution with the usual augmentation."""
  c.dataset = "folder:data/images"  # override with --config.dataset=folder:/your/images
  c.image_size = 0                  # the pretrained weights' size (224 for Lite0)
  c.augment.random_resized_crop = True
  c.augment.scale_min = 0.25
  c.augment.hflip = True
  c.num_epochs = 15
  c.early_stopping.patience = 4
  return c


def for_data(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  if arg in (None, "", "demo"):
    return demo_data(c)
  if arg == "photos":
    return photo_data(c)
  raise ValueError(f"config argument must be 'demo' or 'photos', got {arg!r}")
