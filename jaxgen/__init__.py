"""jaxgen: pretrain, fine-tune and sample transformer language models with JAX/Flax.

    lm = jaxgen.load("runs/tiny")     # a run directory or a Hugging Face model directory
    config = jaxgen.load_config("configs/tiny.yaml", ["train.steps=50"])

The packages are the architecture (README, "Architecture"); this face stays light (no
JAX at import) so the command line starts fast.
"""

from jaxgen.config import Config, load_config
from jaxgen.errors import JaxgenError

__all__ = ["Config", "JaxgenError", "load", "load_config"]
__version__ = "0.1.0"


def load(path, **options):
    """`jaxgen.inference.load(path, step=, dtype=, mesh=)` -> a `jaxgen.inference.LanguageModel`."""
    from jaxgen.inference import load as load_model

    return load_model(path, **options)
