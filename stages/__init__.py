"""tunepipe: one module per pipeline stage; see dvc.yaml for how they connect."""
from stages.common import pin_cpu_math

pin_cpu_math()  # before any stage imports torch: see stages/common.py
