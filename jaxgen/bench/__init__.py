"""Benchmarks behind `jaxgen bench data|generate|train`: each module's `run(...)` yields one
dict per setting, which the CLI prints as a JSON line."""
