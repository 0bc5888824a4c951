"""Device placement for training, in one place.

config.parallel:
  'none'  one device (the default device).
  'jit'   data parallel over all local devices: a 1-D mesh with axis 'data'; the state, the
          frozen backbone and the dataset are replicated, each step's batch is sharded along
          'data' inside the compiled step, and XLA inserts the gradient all-reduce.
  'pmap'  data parallel with ``jax.pmap`` over all local devices (axis 'data'): every device
          holds the replicated state, takes its slice of the global batch, and gradients,
          metrics and BatchNorm statistics are averaged with ``pmean``. The state goes in and
          comes out replicated (``in_axes=None``, ``out_axes=None``), so the loop, checkpoints
          and evaluation see one state whatever the mode. pmap is in maintenance mode since
          JAX 0.8; 'jit' is the recommended mode.

Several hosts (processes): ``config.distributed`` starts ``jax.distributed`` (from its flags, or
auto-detected on clusters JAX knows, e.g. SLURM); 'jit' then spans every device of every
process. In-memory datasets are held by every process (replicated); streamed datasets are read
in parts: each process reads and preprocesses only its slice of every global batch. Process 0
alone writes logs, summaries and result files; all processes save and restore checkpoints
together (orbax), so the workdir must be on a filesystem every host sees.

Batch sizes are global: ``batch_size`` examples per step in all, split evenly over the devices,
so the same config gives the same optimisation on one device or many (up to float rounding).
Augmentation and key/query dropout are drawn for the global batch and sliced, so every mode
gives each example the same random transform and masks. (A backbone's own dropout, in the
backbone stage, is drawn per device under pmap: statistically the same, not the same numbers.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train import versions
from train.errors import UserError

MODES = ("none", "jit", "pmap")
AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Placement:
    mesh: Mesh | None
    mode: str = "none"

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    @property
    def axis_name(self) -> str | None:
        """The pmap axis name (None in the other modes)."""
        return AXIS if self.mode == "pmap" else None

    @property
    def batch_sharding(self) -> NamedSharding | None:
        """How a jit step lays out its batch (None: wherever it is; pmap slices by hand)."""
        if self.mode != "jit":
            return None
        return NamedSharding(self.mesh, PartitionSpec(AXIS))

    @property
    def process_shard(self) -> tuple[int, int]:
        """(this process, number of processes): which slice of a global batch it reads."""
        return jax.process_index(), jax.process_count()

    def put_batch(self, tree):
        """Puts a host batch on the device(s): this process's slice of the global batch, split
        along its first axis, under 'jit'; the whole batch on every device under 'pmap' (each
        device slices its part); as it is on one device."""
        if self.mode == "pmap":
            return self.replicate(tree)
        if self.mode == "none":
            return jax.device_put(tree)
        n = jax.process_count()
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(
                self.batch_sharding, x, (x.shape[0] * n, *x.shape[1:])
            ),
            tree,
        )

    def replicate(self, tree):
        """Puts ``tree`` on the device (one device) or on every device of the mesh.

        Committed to it in either case: a step's outputs are committed when any of its inputs
        is (a frozen backbone restored by orbax is), and a step first called with an
        uncommitted state and then with its own committed outputs is compiled twice."""
        if self.mesh is None:
            return jax.device_put(tree, one_device())
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    @property
    def one_call_at_a_time(self) -> bool:
        """Whether each compiled call is waited for before the next is dispatched: several
        devices of a CPU host.

        XLA's CPU runtime runs each device's part of a collective (the gradient all-reduce) on a
        thread of a pool the devices share, and a participant holds its thread until all have
        arrived. With calls dispatched ahead (the loop reads results back only at its log
        steps), those threads can all be held by participants of different calls while the
        rest wait for a thread: no rendezvous completes, and XLA aborts the process after 40 s
        ("Termination timeout for `all reduce`"). Seen with 8 forced host devices on a 2-core
        CPU, in both 'jit' and 'pmap', within the demo's first epochs. On a CPU the host is the
        device, so waiting costs no overlap worth having; accelerators keep dispatching ahead.
        """
        return self.num_devices > 1 and self.mesh.devices.flat[0].platform == "cpu"

    def compile(self, step, donate_state: bool = False):
        """Compiles a step ``step(*args, shard=, num_shards=, axis_name=, batch_sharding=)``
        (steps.train_step or steps.eval_batch with their static arguments bound) for this
        placement; returns a function of the positional arguments only (which waits for its
        result where ``one_call_at_a_time``)."""
        fn = self._compile(step, donate_state)
        if not self.one_call_at_a_time:
            return fn

        def waited(*args):
            return jax.block_until_ready(fn(*args))

        return waited

    def _compile(self, step, donate_state: bool):
        if self.mode != "pmap":
            fn = functools.partial(step, batch_sharding=self.batch_sharding)
            return jax.jit(fn, donate_argnums=(0,) if donate_state else ())
        n = self.num_devices

        def per_device(shard, *args):
            return step(*args, shard=shard, num_shards=n, axis_name=AXIS)

        shards = jax.device_put(
            jnp.arange(n, dtype=jnp.int32), NamedSharding(self.mesh, PartitionSpec(AXIS))
        )
        compiled = {}

        def call(*args):
            if len(args) not in compiled:
                compiled[len(args)] = jax.pmap(
                    per_device,
                    axis_name=AXIS,
                    in_axes=(0,) + (None,) * len(args),
                    out_axes=None,
                    devices=list(self.mesh.devices.flat),
                    donate_argnums=(1,) if donate_state else (),
                )
            return compiled[len(args)](shards, *args)

        return call


def initialize(config) -> None:
    """Starts jax.distributed when ``config.distributed`` asks for it (before any computation).

    coordinator_address 'host:port' with num_processes and process_id: from the flags (on CPU,
    collectives go through gloo). auto=True: let JAX detect the cluster (SLURM, TPU pods, ...).
    """
    dist = config.get("distributed")
    if not dist or not (dist.coordinator_address or dist.auto):
        return
    if jax.distributed.is_initialized():
        return
    versions.update("jax_cpu_collectives_implementation", "gloo")  # gone in some versions
    try:
        if dist.coordinator_address:
            jax.distributed.initialize(
                dist.coordinator_address,
                num_processes=dist.num_processes,
                process_id=dist.process_id,
            )
        else:
            jax.distributed.initialize()
    except (RuntimeError, ValueError) as e:
        raise UserError(f"config.distributed: could not start jax.distributed: {e}") from None


def one_device() -> jax.Device:
    """The device of config.parallel='none': jax.default_device's, else the first local one."""
    device = jax.config.jax_default_device
    return device if isinstance(device, jax.Device) else jax.local_devices()[0]


def placement(config) -> Placement:
    mode = config.parallel
    if mode not in MODES:
        raise UserError(f"config.parallel must be one of {MODES}, got {mode!r}")
    processes = jax.process_count()
    if processes > 1 and mode != "jit":
        raise UserError(
            f"{processes} processes (config.distributed) need config.parallel='jit', got {mode!r}"
        )
    if mode == "none":
        return Placement(None)
    devices = np.asarray(jax.devices() if mode == "jit" else jax.local_devices())
    return Placement(Mesh(devices, (AXIS,)), mode)


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
