"""The user-facing model: `load(path)` -> `LanguageModel` (scoring, generation, streaming),
and offline generation from a JSONL file of prompts."""

from jaxgen.inference.language_model import GenerationResult, LanguageModel, load

__all__ = ["GenerationResult", "LanguageModel", "load"]
