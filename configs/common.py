"""Defaults every experiment shares: all keys, each with a comment, live in jtl/config.py.

Command-line overrides look like --config.optimizer.lr=3e-4 or --config.model=resnet50.
"""
import ml_collections

from jtl.config import default_config


def get_config() -> ml_collections.ConfigDict:
  return default_config()
