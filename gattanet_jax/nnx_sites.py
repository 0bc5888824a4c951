"""Attention sites of Flax NNX backbones: the NNX side of the site seam (``sites.call``).

NNX has no interception API; its documented way to change what a model computes is graph
surgery. A backbone is given as its graph definition and state (``graphdef, state =
nnx.split(model)``), and every call works on a fresh copy: ``nnx.merge(graphdef, state)``, each
site submodule swapped for a small wrapper that passes its output through the site function,
the copy run and then discarded. The user's model object is never touched, no class is patched,
and since the copy is made inside whatever function is traced, it composes with ``jax.jit``,
``jax.grad``, ``jax.vmap`` and ``nnx.jit``.

Site names are graph paths as NNX prints them, list indices included: ``blocks/0/conv``.
The copy runs in evaluation mode (``model.eval()``: dropout off, BatchNorm on its running
averages) unless ``train``; ``model(images)`` is the forward pass.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import jax
from flax import nnx


def is_nnx(backbone) -> bool:
    """Whether ``backbone`` is an NNX graph definition (from ``nnx.split``)."""
    return isinstance(backbone, nnx.GraphDef)


def type_name(graphdef) -> str:
    """The model's class name, from its graph definition."""
    nodes = getattr(graphdef, "nodes", None) or [None]
    return getattr(getattr(nodes[0], "type", None), "__name__", "model")


def _name(path) -> str:
    return "/".join(str(p) for p in path)


def plain_functions(graphdef, state) -> dict[str, str]:
    """Attributes of the model that are plain functions (``self.act = nnx.relu``), by path, with
    the function's name: not modules, so not sites."""
    model = nnx.merge(graphdef, state)
    found = {}
    for path, value in nnx.iter_graph(model):
        private = any(str(p).startswith("_") for p in path)
        plain = (
            inspect.isfunction(value)
            or inspect.isbuiltin(value)
            or isinstance(value, functools.partial | jax.custom_jvp | jax.custom_vjp)
        )
        if path and not private and plain:
            found[_name(path)] = getattr(value, "__name__", type(value).__name__)
    return found


class _Wrapper:
    """Stands in for a submodule in the copy; whatever the model does with it besides calling
    it (attributes, iteration and indexing of a container such as ``nnx.List``) reaches the
    submodule itself."""

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, key):
        return self.inner[key]


class _Site(_Wrapper):
    """Stands in for a site's module in the copy: runs it (or, with ``replace``, not) and passes
    the output through the site function."""

    def __init__(self, name, inner, fn, seen, replace):
        self.name, self.inner, self.fn, self.seen, self.replace = name, inner, fn, seen, replace

    def __call__(self, *args, **kwargs):
        self.seen[self.name] += 1
        if self.seen[self.name] > 1:
            raise ValueError(
                f"attention site {self.name!r} ran more than once in one forward pass; a site "
                "must be a module that is called once (a module applied twice is one graph node)"
            )
        if self.replace:
            return self.fn(self.name, args[0])
        return self.fn(self.name, self.inner(*args, **kwargs))


def _paths(model) -> dict[str, tuple]:
    return {_name(p): p for p, v in nnx.iter_graph(model) if p and isinstance(v, nnx.Module)}


def _get(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set(parent, key, value) -> None:
    if isinstance(key, int):
        parent[key] = value
    else:
        object.__setattr__(parent, key, value)


def _swap(model, names: Sequence[str], wrap) -> list[tuple]:
    """Replaces the submodule at each path in ``names`` by ``wrap(name, module)``; returns
    (parent, key, module) of each, to put them back. Every parent is found before anything is
    swapped, so a site inside another site is reached through the original modules."""
    paths = _paths(model)
    unknown = [n for n in names if n not in paths]
    if unknown:
        raise ValueError(f"no submodule at {unknown} in {type(model).__name__}")
    targets = []
    for name in names:
        parent = model
        for key in paths[name][:-1]:
            parent = _get(parent, key)
        key = paths[name][-1]
        targets.append((name, parent, key, _get(parent, key)))
    for name, parent, key, module in targets:
        _set(parent, key, wrap(name, module))
    return [(parent, key, module) for _, parent, key, module in targets]


def call(
    graphdef,
    state,
    images: jax.Array,
    names: Sequence[str],
    fn: Callable[[str, jax.Array], jax.Array],
    *,
    replace: bool = False,
    train: bool = False,
    mutable: bool = False,
):
    """``model(images)`` on a fresh copy with every site in ``names`` passed through ``fn``;
    returns (output, seen) where ``seen`` counts each site's calls, or ((output, new_state),
    seen) with ``mutable``: the copy's state after the call (running averages updated in
    training mode)."""
    model = nnx.merge(graphdef, state)
    if train:
        model.train()
    else:
        model.eval()
    seen = {n: 0 for n in names}
    swapped = _swap(model, names, lambda n, m: _Site(n, m, fn, seen, replace))
    out = model(images)
    if not mutable:
        return out, seen
    for parent, key, module in swapped:  # the copy's own modules back, for its state
        _set(parent, key, module)
    return (out, nnx.split(model)[1]), seen


class _Recorder(_Wrapper):
    """Records a submodule's output shape and its first argument's, as its call ends."""

    def __init__(self, name, inner, found):
        self.name, self.inner, self.found = name, inner, found

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if hasattr(out, "shape"):
            first = tuple(args[0].shape) if args and hasattr(args[0], "shape") else None
            self.found.setdefault(self.name, (tuple(out.shape), first))
        return out


def module_io(graphdef, state, images) -> dict[str, tuple]:
    """(output shape, first argument's shape or None) of every submodule's call, in the order
    the calls end (as on the Linen side)."""
    found: dict[str, tuple] = {}

    def run(s, x):
        model = nnx.merge(graphdef, s)
        model.eval()
        _swap(model, list(_paths(model)), lambda n, m: _Recorder(n, m, found))
        return model(x)

    jax.eval_shape(run, state, images)
    return found
