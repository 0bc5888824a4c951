"""Device placement for training, in one place.

config.parallel:
  'none'  one device (the default device).
  'jit'   data parallel over all local devices: a 1-D mesh with axis 'data'; the state, the
          frozen backbone and the dataset are replicated, each step's batch is sharded along
          'data' inside the compiled step, and XLA inserts the gradient all-reduce.

Batch sizes are global: ``batch_size`` examples per step in all, split evenly over the devices,
so the same config gives the same optimisation on one device or many (up to float rounding).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train.errors import UserError

MODES = ("none", "jit")


@dataclasses.dataclass(frozen=True)
class Placement:
    mesh: Mesh | None

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    @property
    def batch_sharding(self) -> NamedSharding | None:
        """How a step's batch is laid out (None: wherever it is)."""
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec("data"))

    def put_batch(self, tree):
        """Puts a host batch on the device, or splits it over the mesh along its first axis."""
        return jax.device_put(tree, self.batch_sharding)

    def replicate(self, tree):
        """Puts ``tree`` on the device (one device) or on every device of the mesh."""
        if self.mesh is None:
            return jax.device_put(tree)
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))


def placement(config) -> Placement:
    mode = config.parallel
    if mode not in MODES:
        raise UserError(f"config.parallel must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return Placement(None)
    devices = np.asarray(jax.local_devices())
    return Placement(Mesh(devices, ("data",)))


def check_batch_sizes(config, place: Placement) -> None:
    n = place.num_devices
    fields = ("backbone_training.batch_size", "attention_training.batch_size", "eval_batch_size")
    for field in fields:
        section, _, name = field.rpartition(".")
        value = (config[section] if section else config)[name]
        if value % n:
            raise UserError(
                f"config.{field} = {value} does not divide by the {n} devices of "
                f"config.parallel={config.parallel!r}; use a multiple of {n} (batch sizes are "
                "global: summed over the devices)"
            )


def constrain(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
    """Inside a compiled step: lays the batch ``x`` out as ``sharding`` (no-op for None)."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
