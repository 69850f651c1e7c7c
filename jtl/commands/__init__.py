"""The commands of `jtl` (jtl/cli.py), one module each, each with `main(argv) -> int` that
parses its own arguments, then makes one call into the library. A user's mistake exits with
status 2 after one `error:` line (jtl.cli_errors).

A command imports the library (jax, TensorFlow: seconds) only once its arguments are read, so
that `--help` and a mistyped argument answer at once. The library never imports this package.
"""
import os

# TensorFlow (the input pipeline) is quiet by default (jtl.data.tf_setup); set before anything a
# command imports can load it, as that only counts before TensorFlow starts.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
