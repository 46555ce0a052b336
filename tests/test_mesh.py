"""Mesh construction and sharded == single-device equivalence on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxgen.config import MeshConfig
from jaxgen.errors import JaxgenError
from jaxgen.model.transformer import Transformer, abstract_variables, init_params
from jaxgen.runtime import mesh as mesh_lib
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


class _SliceDevice:
    """A CPU device that says which slice it is on, as TPU devices do (`slice_index`)."""

    def __init__(self, device, slice_index):
        self._device, self.slice_index = device, slice_index

    def __getattr__(self, name):
        return getattr(self._device, name)


def test_multi_slice_mesh_keeps_each_slice_a_contiguous_block():
    # Devices 4-7 on slice 0 and 0-3 on slice 1 (out of order on purpose): the TPU path
    # (create_hybrid_device_mesh) groups by slice_index, not by position.
    fake = [_SliceDevice(d, 1 - d.id // 4) for d in jax.devices()]
    grid = mesh_lib._hybrid_grid((2, 2, 1), (2, 1, 1), fake)
    assert grid.shape == (4, 2, 1)
    assert {d.slice_index for d in grid[:2].flat} == {0} and {d.slice_index for d in grid[2:].flat} == {1}
    # Fake CPU devices without slice_index: consecutive runs stand in for the slices.
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, dcn_data=2))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert sorted(d.id for d in mesh.devices[:2].flat) == [0, 1, 2, 3]
    mesh = make_mesh(MeshConfig(data=-1, tensor=2, dcn_fsdp=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices[:, 0].flat) == [0, 1, 2, 3]
    with pytest.raises(
        JaxgenError, match=r"^mesh: 8 devices cannot form dcn_data\*dcn_fsdp = 3 equal slices$"
    ):
        make_mesh(MeshConfig(dcn_data=3))


def test_multi_slice_sharded_forward_equals_single_device(tiny_config):
    config = tiny_config.model
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)
    single = Transformer(config).apply({"params": params}, tokens, positions)[0]
    mesh_cfg = MeshConfig(data=1, fsdp=2, tensor=2, dcn_data=2)
    _, out = _sharded_forward(config, mesh_cfg, params, tokens, positions)
    np.testing.assert_allclose(out, single, atol=1e-5, rtol=0)
    assert len(out.sharding.device_set) == 8
