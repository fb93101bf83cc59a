"""The folder the launcher puts first on every rank host's PYTHONPATH (`launcher.render`): its
`sitecustomize` runs at the start of each Python process of a launch."""

from pathlib import Path

FOLDER = str(Path(__file__).resolve().parent)
