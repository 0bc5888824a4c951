"""An NNX model seen through Linen's functional interface: ``init(rng, images)`` gives its
variables nested as Linen nests them (``{'params': ..., 'batch_stats': ...}``, by module path),
``apply(variables, images, train=, rngs=, mutable=)`` runs it. Every call is an NNX forward
pass: a fresh copy merged from the model's graph definition and a state made from the
variables, through the site seam (``nnx_sites.call``), so attention sites are NNX graph paths
and the model's own ``__call__`` runs.

This is how the training library (``model.api='nnx'``) drives an NNX backbone: its
checkpoints, digests, weight loading and every loop work on the same variables as for the
Linen twin (the project's NNX backbones have the Linen ones' module paths and parameter names),
so a backbone trained with either API serves an attention run of the other.

Randomness: the model's ``nnx.Rngs`` streams are not carried between calls; each call draws
its dropout from the key it is given (``rngs={'dropout': key}``, as Linen's ``apply``), so a
step is a pure function of its inputs and resumes exactly. The bits differ from Linen's for the
same key (the two frameworks derive per-layer keys differently); the distribution is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gattanet_jax import nnx_sites

# NNX variable type -> the Linen collection that holds it
COLLECTIONS = {nnx.Param: "params", nnx.BatchStat: "batch_stats"}


def _collection(variable) -> str | None:
    for kind, name in COLLECTIONS.items():
        if isinstance(variable, kind):
            return name
    return None


def _get(tree, path):
    for key in path:
        tree = tree[str(key)]
    return tree


class NNXBackbone:
    """``make(rngs)`` builds the NNX model (``rngs``: an ``nnx.Rngs``); the backbone is built
    once as shapes (``nnx.eval_shape``) for its graph definition."""

    def __init__(self, make: Callable[[nnx.Rngs], nnx.Module]):
        self.make = make
        self.graphdef, self.abstract = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
        self.flat = list(nnx.to_flat_state(self.abstract))
        other = sorted(
            {
                type(v).__name__
                for _, v in self.flat
                if _collection(v) is None and not isinstance(v, nnx.RngState)
            }
        )
        if other:
            raise ValueError(
                f"{self.type_name} holds NNX variables of types {other}: only parameters, "
                "batch statistics and random streams can be driven as Linen variables"
            )

    @property
    def type_name(self) -> str:
        return nnx_sites.type_name(self.graphdef)

    def __repr__(self) -> str:
        return f"NNXBackbone({self.type_name})"

    def init(self, rng: jax.Array, images: jax.Array | None = None) -> dict:
        """The model's initial variables, drawn by NNX from ``rng`` (``images`` unused: NNX
        modules know their shapes)."""
        del images
        return variables_of(nnx.state(self.make(nnx.Rngs(rng))))

    def state(self, variables, key: jax.Array | None = None) -> nnx.State:
        """The NNX state of ``variables``: every parameter and statistic from its Linen
        collection; every random stream set to ``key`` (a fixed key without one)."""
        if key is None:
            key = jax.random.key(0)
        elif not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        flat = []
        for path, variable in self.flat:
            name = _collection(variable)
            if name is not None:
                value = _get(variables[name], path)
            elif isinstance(variable, nnx.RngKey):
                value = key
            else:  # nnx.RngCount
                value = jnp.zeros((), jnp.uint32)
            flat.append((path, variable.replace(value)))
        return nnx.from_flat_state(flat)

    def call(
        self,
        variables,
        images: jax.Array,
        names: Sequence[str],
        fn,
        *,
        replace: bool = False,
        train: bool = False,
        rngs: dict | None = None,
        mutable: Sequence[str] | bool = (),
    ):
        """The seam (``sites.call``) for this backbone: as a Linen module's, with the updated
        collections that ``mutable`` names."""
        key = (rngs or {}).get("dropout")
        state = self.state(variables, key)
        out, seen = nnx_sites.call(
            self.graphdef, state, images, names, fn, replace=replace, train=train,
            mutable=bool(mutable),
        )  # fmt: skip
        if not mutable:
            return out, seen
        out, new_state = out
        wanted = set(variables) - {"params"} if mutable is True else set(mutable)
        updates = {k: v for k, v in variables_of(new_state).items() if k in wanted}
        return (out, updates), seen

    def apply(
        self,
        variables,
        images: jax.Array,
        *,
        train: bool = False,
        rngs: dict | None = None,
        mutable: Sequence[str] | bool = False,
    ):
        """``model(images)`` (after ``model.train()`` or ``model.eval()``), as Linen's
        ``apply``: the output, or (output, updated collections) where ``mutable`` is not
        False (a list of collections, empty or not, or True for all)."""
        if mutable is False:
            return self.call(variables, images, [], None, train=train, rngs=rngs)[0]
        if not mutable:  # an empty list: no collection changes
            out = self.call(variables, images, [], None, train=train, rngs=rngs)[0]
            return out, {}
        return self.call(variables, images, [], None, train=train, rngs=rngs, mutable=mutable)[0]


def variables_of(state: nnx.State) -> dict:
    """An NNX state's parameters and batch statistics nested as Linen's collections."""
    out: dict = {}
    for path, variable in nnx.to_flat_state(state):
        name = _collection(variable)
        if name is None:
            continue
        node = out.setdefault(name, {})
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = variable.get_value()
    return out
