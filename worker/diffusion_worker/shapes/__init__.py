"""`builtin:shapes`: a small text-to-image model trained on procedurally drawn shapes.

`dataset` draws the training images and their prompts, `model` builds the diffusers pipeline,
`train` trains it (`make train-demo-model`), `evaluate` measures whether images match prompts.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
