"""The decoder-only transformer (import from the submodules: transformer, layers, ...)."""
