"""Feature extraction: EfficientNet-Lite0 frozen (shipped ImageNet weights), a new head trained.

  python -m jtl.main --config configs/feature_extraction.py --workdir runs/feature
  python -m jtl.main --config configs/feature_extraction.py:photos --workdir runs/mine \\
      --config.dataset=folder:/path/to/images

On the demo data it reached RESULT_FEATURE.
"""
from configs import common


def get_config(arg=None):
  c = common.for_data(common.get_config(), arg)
  c.model = "efficientnet_lite0"
  c.strategy = "feature_extraction"
  c.optimizer.lr = 3e-3             # only the head trains: a larger step is safe
  return c
