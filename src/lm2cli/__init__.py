"""lm2: the InternLM2 recipe as composable commands."""

__version__ = "0.1.0"
