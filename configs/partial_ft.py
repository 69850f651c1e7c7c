"""Partial fine-tuning of EfficientNet-Lite0 (shipped ImageNet weights) on the demo data.

  python -m jtl.main --config configs/partial_ft.py --workdir runs/partial
  Result on the demo data: see README ("The demo").
"""
from configs import common


def get_config():
  c = common.get_config()
  c.strategy = "partial"
  c.freeze_depth = 4                # stem, stage1..stage3 frozen; stage4..top and head train
  return c
