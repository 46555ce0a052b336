"""Mesh construction and sharded == single-device equivalence on 8 fake CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxgen.config import MeshConfig
from jaxgen.errors import JaxgenError
from jaxgen.model.transformer import Transformer, abstract_variables, init_params
from jaxgen.runtime.mesh import activate, batch_sharding, make_mesh, mesh_shape, param_shardings


def test_mesh_shape_resolves_the_rest_and_rejects_mismatches():
    assert mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(JaxgenError, match="data\\*fsdp\\*tensor = 4 but there are 8 devices"):
        mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(JaxgenError, match="cannot fill 8 devices"):
        mesh_shape(MeshConfig(data=-1, fsdp=3), 8)


def _sharded_forward(config, mesh_cfg, params, tokens, positions):
    mesh = make_mesh(mesh_cfg)
    shardings = param_shardings(mesh, abstract_variables(config))["params"]
    with activate(mesh):
        placed = jax.device_put(params, shardings)
        tokens = jax.device_put(tokens, batch_sharding(mesh))
        positions = jax.device_put(positions, batch_sharding(mesh))
        forward = jax.jit(lambda p, t, s: Transformer(config).apply({"params": p}, t, s)[0])
        return placed, forward(placed, tokens, positions)


@pytest.mark.parametrize("family", ["tiny_config", "tiny_llama_config"])
def test_sharded_forward_equals_single_device(family, request):
    config = request.getfixturevalue(family).model
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, config.vocab_size)
    positions = np.broadcast_to(np.arange(16), (8, 16))
    single = jax.jit(lambda p, t, s: Transformer(config).apply({"params": p}, t, s)[0])(
        jax.device_put(params, jax.devices()[0]), tokens, positions
    )
    for data, fsdp, tensor in [(8, 1, 1), (2, 2, 2), (1, 4, 2)]:
        placed, out = _sharded_forward(
            config, MeshConfig(data=data, fsdp=fsdp, tensor=tensor), params, tokens, positions
        )
        np.testing.assert_allclose(out, single, atol=1e-5, rtol=0, err_msg=f"mesh {(data, fsdp, tensor)}")
        assert len(out.sharding.device_set) == 8


def test_params_land_where_the_logical_rules_say(tiny_llama_config):
    config = tiny_llama_config.model
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    shardings = param_shardings(mesh, abstract_variables(config))["params"]
    params = jax.jit(lambda k: init_params(config, k), out_shardings=shardings)(jax.random.key(0))
    expect = {
        ("embed", "embedding"): P("tensor", "fsdp"),  # (vocab, embed)
        ("layers", "attn", "query", "kernel"): P(
            None, "fsdp", "tensor", None
        ),  # (layers, embed, heads, head_dim)
        ("layers", "attn", "key", "kernel"): P(None, "fsdp", "tensor", None),
        ("layers", "attn", "out", "kernel"): P(None, "tensor", None, "fsdp"),
        ("layers", "mlp", "gate", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "mlp", "down", "kernel"): P(None, "tensor", "fsdp"),
        ("layers", "attn_norm", "scale"): P(None, "fsdp"),
        ("lm_head",): P("fsdp", "tensor"),
    }
    for path, spec in expect.items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        assert leaf.sharding.spec == spec, path
        # Each device holds 1/(fsdp*tensor) of a fully sharded weight.
    kernel = params["layers"]["mlp"]["gate"]["kernel"]
    assert kernel.addressable_shards[0].data.size == kernel.size // 8
