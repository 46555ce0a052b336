"""jaxgen: pretrain, fine-tune and sample transformer language models with JAX/Flax."""

from jaxgen.config import Config, load_config
from jaxgen.errors import JaxgenError

__all__ = ["Config", "JaxgenError", "LanguageModel", "load", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `load` / `LanguageModel` import JAX: resolved on first use so `import jaxgen` stays light.
    if name in ("load", "LanguageModel"):
        from jaxgen.inference import language_model as api

        return getattr(api, name)
    raise AttributeError(f"module 'jaxgen' has no attribute {name!r}")
