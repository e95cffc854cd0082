"""Sharded forward on 8 simulated CPU devices (see conftest.py) equals the unsharded forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from hsd_jax import sharding
from models import hf
from tests.hf_reference import TINY, make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(path, num_attention_heads=4, num_key_value_heads=2)
    return path


def jitted_hidden(model, tokens):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        hidden, _ = nnx.merge(graphdef, state)(tokens, positions)
        return hidden

    return np.asarray(forward(state, tokens))


# q_proj is [L=2, D=48, N=4, H=16] with logical axes (layers, embed, heads, head_dim):
# embed splits over fsdp, heads over tensor, the others stay whole.
@pytest.mark.parametrize(
    "shape,q_proj_spec",
    [((8, 1, 1), P(None, None, None, None)), ((1, 4, 2), P(None, "fsdp", "tensor", None)),
     ((2, 2, 2), P(None, "fsdp", "tensor", None))],
)
def test_sharded_forward_equals_unsharded(checkpoint, shape, q_proj_spec):
    assert jax.device_count() == 8
    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], (8, 10))
    expected = jitted_hidden(hf.load_model(checkpoint), jnp.asarray(tokens))

    mesh = sharding.make_mesh(shape)
    model = hf.load_model(checkpoint, mesh=mesh)
    assert model.layers.q_proj[...].sharding.spec == q_proj_spec
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, 2, batch_size=8))
    np.testing.assert_allclose(jitted_hidden(model, tokens), expected, atol=1e-5, rtol=0)


def test_partition_spec_skips_axes_that_do_not_divide():
    mesh = sharding.make_mesh((1, 4, 2))
    assert sharding.partition_spec((96, 48), ("vocab", "embed"), mesh) == P("tensor", "fsdp")
    assert sharding.partition_spec((97, 46), ("vocab", "embed"), mesh) == P(None, None)
    assert sharding.partition_spec((16, 3), ("batch", None), mesh) == P("fsdp", None)


# The batch rule is (data, fsdp): each mesh axis is taken, in order, if its size divides what the
# axes already taken leave of the batch.
@pytest.mark.parametrize(
    "mesh_shape,batch,spec,rows_per_device",
    [((2, 2, 2), 8, P(("data", "fsdp"), None), 2),
     ((2, 2, 2), 6, P("data", None), 3),  # data (2) divides 6, data x fsdp (4) does not
     ((4, 2, 1), 12, P("data", None), 3),  # data (4) divides 12, data x fsdp (8) does not
     ((4, 2, 1), 6, P("fsdp", None), 3),  # data (4) does not divide 6, fsdp (2) does
     ((2, 2, 2), 3, P(None, None), 3)],
)
def test_batch_takes_the_mesh_axes_that_divide_it(mesh_shape, batch, spec, rows_per_device):
    mesh = sharding.make_mesh(mesh_shape)
    target = sharding.batch_sharding(mesh, 2, batch_size=batch)
    assert target.spec == spec
    rows = np.arange(batch * 5).reshape(batch, 5)
    placed = jax.device_put(rows, target)
    for shard in placed.addressable_shards:
        assert shard.data.shape == (rows_per_device, 5)
        np.testing.assert_array_equal(shard.data, rows[shard.index])
    constrained = jax.jit(lambda x: sharding.constrain_batch(x * 2, mesh))(placed)
    assert constrained.sharding.spec == spec
    np.testing.assert_array_equal(constrained, rows * 2)


def test_reshard_moves_to_new_layout(checkpoint):
    mesh = sharding.make_mesh((1, 4, 2))
    _, state = nnx.split(hf.load_model(checkpoint, mesh=mesh))
    target_mesh = sharding.make_mesh((8, 1, 1))
    arrays = nnx.to_pure_dict(state)
    axes = nnx.to_pure_dict(jax.tree.map(lambda v: v.logical_axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    targets = sharding.tree_shardings(arrays, axes, target_mesh)
    moved = sharding.reshard(arrays, targets)
    for before, after, target in zip(jax.tree.leaves(arrays), jax.tree.leaves(moved), jax.tree.leaves(targets)):
        assert after.sharding == target
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("shape", [(3, 1, 1), (2, -1, 3), (-1, -1, 1), (0, 8, 1)])
def test_bad_mesh_is_a_clear_error(shape):
    with pytest.raises(ValueError, match="mesh shape"):
        sharding.make_mesh(shape)


def test_minus_one_fills_remaining_devices():
    assert dict(sharding.make_mesh((2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_optimizer_moments_are_sharded_like_their_parameters():
    import optax

    mesh = sharding.make_mesh((1, 8, 1))
    params = {"w": jax.device_put(np.ones((16, 4), np.float32), jax.sharding.NamedSharding(mesh, P("fsdp", None))),
              "b": jax.device_put(np.ones((4,), np.float32), jax.sharding.NamedSharding(mesh, P()))}
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = jax.jit(optimizer.init, out_shardings=sharding.optimizer_shardings(optimizer, params))(params)
    adam = state[1][0]
    for moment in (adam.mu, adam.nu):
        assert moment["w"].sharding.spec == P("fsdp", None)
        assert moment["w"].addressable_shards[0].data.shape == (2, 4)  # 16 rows over 8 devices
        assert moment["b"].sharding.spec == P()
    assert adam.count.sharding.spec == P()
