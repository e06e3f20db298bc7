"""Entry script: ``python launch/report.py <output_dir>`` -> ``<output_dir>/report/{*.png,summary.md}``."""

import sys

from aligner.evaluation.report import main

if __name__ == "__main__":
    sys.exit(main())
