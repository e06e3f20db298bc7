"""Entry script: ``deepspeed --num_gpus 2 launch/train.py --config configs/tiny-cpu.yaml --plugins dpo``.

The recipe itself is :mod:`aligner.recipes.train` (also installed as ``aligner-train``).
"""

import sys

from aligner.recipes.train import main

if __name__ == "__main__":
    sys.exit(main())
