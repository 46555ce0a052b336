"""benchmarks/grow_run.py: a grown model computes the run's function (the speculative
benchmark's weight-bound model starts from it), and the script writes a run jaxgen loads."""

import importlib.util
import pathlib

import jax
import numpy as np

from jaxgen.checkpoint import load_params, save_params
from jaxgen.config.loading import load_config
from jaxgen.model.transformer import init_params

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "grow_run.py"
spec = importlib.util.spec_from_file_location("grow_run", SCRIPT)
grow_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grow_run)


def _run(tmp_path):
    config = load_config(
        None, ["model.preset=tiny-llama", "model.tie_embeddings=true", "model.dtype=float32"]
    )
    params = jax.jit(init_params, static_argnums=0)(config.model, jax.random.key(3))
    # Trained norms are not all ones: make them differ per dim, as the rescaling must hold.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x * (1 + 0.5 * np.sin(np.arange(x.size)).reshape(x.shape))
            if "scale" in jax.tree_util.keystr(path)
            else x
        ),
        params,
    )
    save_params(tmp_path / "small", config, params)
    return config, params


def test_grown_run_computes_the_same_logits(tmp_path):
    config, params = _run(tmp_path)
    m = config.model
    args = [
        "--layers",
        str(m.num_layers + 1),
        "--d-model",
        str(2 * m.d_model),
        "--mlp-dim",
        str(2 * m.mlp_dim),
    ]
    assert grow_run.main([str(tmp_path / "small"), str(tmp_path / "grown"), *args]) == 0
    grown_config, grown = load_params(tmp_path / "grown")
    g = grown_config.model
    assert (g.num_layers, g.d_model, g.mlp_dim, g.dim_per_head) == (
        m.num_layers + 1, 2 * m.d_model, 2 * m.mlp_dim, m.dim_per_head,
    )  # fmt: skip
    tokens = np.random.default_rng(1).integers(0, m.vocab_size, (2, 16), dtype=np.int32)
    want = grow_run.logits(m, params, tokens)
    got = grow_run.logits(g, grown, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # The new parts are there to be trained: the random reads are kept, not zeroed.
    assert np.abs(np.asarray(grown["layers"]["attn"]["query"]["kernel"][-1])).max() > 0
