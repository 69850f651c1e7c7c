"""Pruning a trained run: magnitude masks held by the optimizer (magnitude), narrower blocks
(channels), and the measurements and summaries of the pruned runs (measure, summary).

`python -m jtl.prune` is the command; this package imports nothing on its own, so that
`jtl.optim` can use `jtl.pruning.magnitude` without loading the rest.
"""
