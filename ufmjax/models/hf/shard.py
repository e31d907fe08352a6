"""Pretrained weights laid out over a device mesh (`jax.sharding`), so a model too large for
one device is split across several.

The mesh has two axes: "alpha" (the sweep's grid, as for every model) and "model" (the
hidden and head dimensions of the weights, Megatron-style): query/key/value, gate and up
projections are split along their outputs, the attention-output and down projections along
their inputs, the embedding and head along the vocabulary. A dimension the model axis does
not divide stays whole (that weight is replicated), so any mesh works on any model; XLA
inserts the collectives. The kernel sees the mesh on the weights (`kernel.driver.model_mesh`)
and leaves them where they are.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# ufmjax weight name -> the axis split over "model" (absent: replicated, e.g. norms).
SPLIT_AXIS = {"q_w": 0, "k_w": 0, "v_w": 0, "q_b": 0, "k_b": 0, "v_b": 0, "o_w": 1,
              "gate_w": 0, "up_w": 0, "gate_b": 0, "up_b": 0, "down_w": 1,
              "embed": 0, "head_w": 0}


def model_mesh(model: int | None = None, devices=None) -> Mesh:
    """A ("alpha", "model") mesh of `devices` (all by default) with `model` devices per model
    replica (default: all of them), the rest over alpha."""
    devices = list(jax.devices() if devices is None else devices)
    model = len(devices) if model is None else model
    if not isinstance(model, int) or model < 1 or len(devices) % model:
        raise ValueError(f"--model-devices must divide the {len(devices)} devices, got {model!r}")
    return Mesh(np.asarray(devices).reshape(len(devices) // model, model), ("alpha", "model"))


def partition(key: str, shape: tuple, model_size: int) -> PartitionSpec:
    """How weight `key` of `shape` is laid out on a mesh whose model axis has `model_size` devices."""
    axis = SPLIT_AXIS.get(key)
    if axis is None or len(shape) <= axis or shape[axis] % model_size:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[axis] = "model"
    return PartitionSpec(*spec)


def sharded_put(mesh: Mesh):
    """`put(x, key)` for `load_decoder`: each weight straight onto its layout on the mesh."""
    size = mesh.shape["model"]

    def put(x, key):
        return jax.device_put(x, NamedSharding(mesh, partition(key, x.shape, size)))

    return put
