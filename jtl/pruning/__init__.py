"""Pruning a trained run: magnitude masks held by the optimizer (magnitude), narrower blocks
(channels), and the measurements and summaries of the pruned runs (measure, summary).

`jtl prune` is the command (jtl/commands/prune.py, then jtl/prune.py); this package imports
nothing on its own, so that `jtl.optim` can use `jtl.pruning.magnitude` without loading the rest.
"""
