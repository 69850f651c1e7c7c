"""Feature extraction: EfficientNet-Lite0 frozen (shipped ImageNet weights), a new head trained.

  python -m jtl.main --config configs/feature_extraction.py --workdir runs/feature
  python -m jtl.main --config configs/feature_extraction.py:photos --workdir runs/mine \\
      --config.dataset=folder:/path/to/images

On the demo data (20,000 training images at 64 px; 12,810 trainable parameters) the solved
head (below) reached 86.45% accuracy on the full 10,000-image Fashion-MNIST test set: L2
strength 0.01 by 5-fold cross-validation (6 of the 8 strengths tried, 30 fold fits at
probe.cv_tolerance), the refit converged in 471 L-BFGS iterations; 29 s to cache the pooled
features, 33 s for the solve, 75 s for the whole command, on the 2-core development machine
(CPU only, 2026-12-03, quiet; with every fold fit at 1e-4 the solve took 85 s, and 281-311 s
the day before on the machine then loaded). In the minibatch loop (--config.probe.solver=sgd)
it reached 86.3%: 54 s to cache the backbone's pooled features once (train, val, test), 5.8 s
to train the head for 1,248 steps, 83 s for the whole command (2026-12-01, quiet). Before
this config followed the linear-evaluation protocol: 85.7% after 129 s of training on images.
"""
from configs import common


def get_config(arg=None):
  c = common.for_data(common.get_config(), arg)
  c.model = "efficientnet_lite0"
  c.strategy = "feature_extraction"
  # The head is one dense layer on the backbone's pooled features: with them cached in memory
  # it is solved as a linear probe (config.probe.solver="lbfgs": L-BFGS to convergence, the L2
  # strength cross-validated; jtl/linear_probe.py). The minibatch settings below are for when it
  # is not (the photos config's random augmentation keeps the backbone running: no cache).
  c.optimizer.lr = 3e-3             # only the head trains: a larger step is safe
  # A linear head on fixed features is logistic regression: judge it by the validation loss,
  # which goes on falling while the head converges; accuracy on a few dozen validation images
  # stops moving early and picks under-trained heads (scikit-learn's digits, 60 validation
  # images, 500 steps: val_accuracy kept step 108, 92.0% test accuracy; val_loss step 432,
  # 93.0%; with 1,000 steps step 810, 93.9%, the converged logistic regression's figure).
  c.early_stopping.metric = "val_loss"
  if arg in (None, "", "demo"):
    # The linear-evaluation protocol (Kornblith et al., 2019): the eval transform's features,
    # no augmentation. The backbone then runs once per image (one cached view, half the work of
    # identity + flip; a flip is wrong for digits and text anyway) and a step on the cache costs
    # a few ms, so the head gets 1,000 steps at least.
    c.augment.hflip = False
    c.min_train_steps = 1000
  return c
