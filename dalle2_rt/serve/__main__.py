"""``python -m dalle2_rt.serve`` = ``dalle2-rt serve``."""
import sys

from .cli import main

sys.exit(main())
