"""`jaxlora.parallel.mesh` and `jaxlora.parallel.rules`, without devices: axis sizes against the device
count, and which dimension of which weight each rule splits (an abstract mesh of the sizes asked)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from jaxlora.parallel import AXES, MeshConfigError, ParallelConfig, ShardingWarning, make_mesh, state_shardings
from jaxlora.parallel.rules import rule_for
from jaxlora.quant import quantize_4bit


def test_sizes_fill_in_the_devices_left_over():
    assert ParallelConfig().sizes(8) == (1, 8, 1)  # the default: every device on fsdp
    assert ParallelConfig(data=2).sizes(8) == (2, 4, 1)
    assert ParallelConfig(data=2, fsdp=2, tensor=2).sizes(8) == (2, 2, 2)
    assert ParallelConfig(data=-1, fsdp=1, tensor=2).sizes(8) == (4, 1, 2)
    with pytest.raises(MeshConfigError, match="3 x 1 x 1 = 3, but there are 8 devices"):
        ParallelConfig(data=3, fsdp=1).sizes(8)
    with pytest.raises(MeshConfigError, match="8 is not a multiple of 3"):
        ParallelConfig(tensor=3).sizes(8)
    with pytest.raises(ValueError, match="parallel.fsdp = 0"):
        ParallelConfig(fsdp=0)
    with pytest.raises(ValueError, match="at most one"):
        ParallelConfig(data=-1, fsdp=-1)


def test_the_mesh_has_auto_axes():
    mesh = make_mesh()
    assert mesh.axis_names == AXES and mesh.size == len(jax.devices())
    assert mesh.axis_types == (AxisType.Auto,) * 3


@pytest.mark.parametrize("path,axes", [
    ("base_model.model.layers.3.self_attn.q_proj.base.weight", ("tensor", "fsdp")),
    ("model.layers.0.mlp.up_proj.weight", ("tensor", "fsdp")),
    ("base_model.model.layers.stacked_layer.self_attn.o_proj.base.weight", ("fsdp", "tensor")),
    ("model.layers.1.mlp.down_proj.weight", ("fsdp", "tensor")),
    ("base_model.model.embed_tokens.weight", ("tensor", "fsdp")),
    ("base_model.lm_head.modules_to_save.default.weight", ("tensor", "fsdp")),
    ("base_model.model.layers.3.self_attn.q_proj.lora_A.default", None),
    ("base_model.model.layers.3.self_attn.q_proj.lora_B.default", None),
    ("base_model.model.layers.3.input_layernorm.weight", None),
    ("base_model.model.norm.weight", None),
])
def test_the_rules(path, axes):
    assert rule_for(path) == axes


def abstract_mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), AXES, axis_types=(AxisType.Auto,) * 3)


def test_dense_weights_split_and_stacked_layers_keep_their_axis():
    state = {"layers": {"stacked_layer": {"self_attn": {"q_proj": {"weight": jnp.zeros((3, 64, 32))},
                                                         "o_proj": {"weight": jnp.zeros((3, 32, 64))}},
                                          "input_layernorm": {"weight": jnp.zeros((3, 32))}}},
             "embed_tokens": {"weight": jnp.zeros((97, 32))}}
    with pytest.warns(ShardingWarning, match=r"embed_tokens.weight: dimension 97 of \(97, 32\) is not a multiple of tensor=2"):
        got = state_shardings(state, abstract_mesh(1, 2, 2))
    layer = got["layers"]["stacked_layer"]
    assert layer["self_attn"]["q_proj"]["weight"].spec == PartitionSpec(None, "tensor", "fsdp")
    assert layer["self_attn"]["o_proj"]["weight"].spec == PartitionSpec(None, "fsdp", "tensor")
    assert layer["input_layernorm"]["weight"].spec == PartitionSpec()
    assert got["embed_tokens"]["weight"].spec == PartitionSpec(None, "fsdp")


def test_4bit_weights_split_on_whole_blocks_or_stay_whole():
    q = quantize_4bit(jnp.ones((64, 32)), blocksize=64, quant_type="nf4", double_quant=True)  # 32 blocks
    odd = quantize_4bit(jnp.ones((5, 30)), blocksize=64, quant_type="nf4", double_quant=True)  # 3 blocks, the last partial
    state = {"a": {"q_proj": {"weight": q}}, "b": {"down_proj": {"weight": odd}}}
    with pytest.warns(ShardingWarning, match=r"b.down_proj.weight: \(5, 30\) in 3 blocks of 64 \(a partial last block\)"):
        got = state_shardings(state, abstract_mesh(2, 2, 2))
    split = got["a"]["q_proj"]["weight"]
    assert split.packed.spec == split.absmax.spec == PartitionSpec(("tensor", "fsdp"))  # out axis first
    assert split.nested_absmax.spec == split.offset.spec == PartitionSpec()
    assert got["b"]["down_proj"]["weight"].packed.spec == PartitionSpec()


def test_process_settings_are_checked():
    assert ParallelConfig(coordinator="host0:1234", num_processes=2, process_id=1).num_processes == 2
    with pytest.raises(ValueError, match="needs parallel.coordinator"):
        ParallelConfig(num_processes=2)
    with pytest.raises(ValueError, match="expected 0 <= process_id < num_processes"):
        ParallelConfig(coordinator="host0:1234", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="heartbeat_timeout = 0"):
        ParallelConfig(heartbeat_timeout=0)
