"""The ablation driver as a script of this folder: `jtl ablate` (jtl/commands/ablate.py, the grid
itself in jtl/ablation.py).

  python experiments/ablate.py --config configs/partial_ft.py --out runs/ablation \\
      --grid freeze_depth=0,2,4 --grid optimizer.lr=1e-3,3e-3 --set num_epochs=3
"""
import sys

from jtl.commands import ablate

if __name__ == "__main__":
  sys.exit(ablate.main())
