"""Benchmarks behind `jaxgen bench train|generate|data`: one JSON line per setting."""
