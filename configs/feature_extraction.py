"""Feature extraction: EfficientNet-Lite0 frozen, a new head trained, on the demo data.

  python -m jtl.main --config configs/feature_extraction.py --workdir runs/feature
  Result on the demo data: see README ("The demo").
"""
from configs import common


def get_config():
  c = common.get_config()
  c.strategy = "feature_extraction"
  c.optimizer.lr = 3e-3             # only the head trains: a larger step is safe
  return c
