"""Full fine-tuning: every EfficientNet-Lite0 parameter trains (from its ImageNet weights).

  python -m jtl.main --config configs/full_ft.py --workdir runs/full
  python -m jtl.main --config configs/full_ft.py:photos --workdir runs/mine \\
      --config.dataset=folder:/path/to/images

On the demo data (20,000 training images at 64 px, 2 epochs) it reached 88.8% accuracy on the
full 10,000-image Fashion-MNIST test set in 1,153 s of training on the 2-core development CPU,
measured while three other jobs shared its two cores (load average about 6): expect roughly a
third of that on a quiet machine.
"""
from configs import common


def get_config(arg=None):
  c = common.for_data(common.get_config(), arg)
  c.model = "efficientnet_lite0"
  c.strategy = "full"
  c.optimizer.lr = 1e-3             # the whole backbone moves: a smaller step
  c.optimizer.layer_decay = 0.8     # lower stages move less than the head
  return c
