"""Full fine-tuning: every EfficientNet-Lite0 parameter trains, on the demo data.

  python -m jtl.main --config configs/full_ft.py --workdir runs/full
  Result on the demo data: see README ("The demo").
"""
from configs import common


def get_config():
  c = common.get_config()
  c.strategy = "full"
  c.optimizer.lr = 5e-4             # the whole backbone moves: a smaller step
  c.optimizer.layer_decay = 0.8     # lower stages move less than the head
  return c
