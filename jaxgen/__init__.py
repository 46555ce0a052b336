"""jaxgen: pretrain, fine-tune and sample transformer language models with JAX/Flax."""

from jaxgen.config import Config, load_config
from jaxgen.errors import JaxgenError
from jaxgen.inference import LanguageModel, load

__all__ = ["Config", "JaxgenError", "LanguageModel", "load", "load_config"]
__version__ = "0.1.0"
