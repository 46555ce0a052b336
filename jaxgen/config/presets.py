"""Published model shapes by name. Param counts are checked by tests/test_model.py."""

PRESETS: dict[str, dict] = {
    # Tiny model shared by all tests: cheap to compile, every code path exercised.
    "tiny": dict(family="gpt2", vocab_size=512, num_layers=2, d_model=64, num_heads=4, max_len=64),
    "tiny-llama": dict(
        family="llama",
        vocab_size=512,
        num_layers=2,
        d_model=64,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=176,
        max_len=64,
        tie_embeddings=False,
    ),
    "gpt2-124m": dict(
        family="gpt2", vocab_size=50257, num_layers=12, d_model=768, num_heads=12, max_len=1024
    ),
    "gpt2-350m": dict(
        family="gpt2", vocab_size=50257, num_layers=24, d_model=1024, num_heads=16, max_len=1024
    ),
    "gpt2-774m": dict(
        family="gpt2", vocab_size=50257, num_layers=36, d_model=1280, num_heads=20, max_len=1024
    ),
    "gpt2-1.5b": dict(
        family="gpt2", vocab_size=50257, num_layers=48, d_model=1600, num_heads=25, max_len=1024
    ),
    # TinyLlama-1.1B's shape.
    "llama-1.1b": dict(
        family="llama",
        vocab_size=32000,
        num_layers=22,
        d_model=2048,
        num_heads=32,
        num_kv_heads=4,
        mlp_dim=5632,
        max_len=2048,
        tie_embeddings=False,
        norm_eps=1e-5,
    ),
    "llama2-7b": dict(
        family="llama",
        vocab_size=32000,
        num_layers=32,
        d_model=4096,
        num_heads=32,
        mlp_dim=11008,
        max_len=4096,
        tie_embeddings=False,
        norm_eps=1e-5,
    ),
    "llama3-8b": dict(
        family="llama",
        vocab_size=128256,
        num_layers=32,
        d_model=4096,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14336,
        max_len=8192,
        rope_theta=500000.0,
        tie_embeddings=False,
        norm_eps=1e-5,
    ),
}
