"""Attention sites: which backbone layers talk to the attention system, and how.

A site is a submodule of the backbone, named by its module path ('conv1', 'layer2/1', ...).
Its *output* (the value its ``__call__`` returns) is what the attention system reads and
modulates. The backbone knows nothing of this. One seam reaches its layers, ``call``: for a
Linen module through ``flax.linen.intercept_methods``, entered inside whatever function is
traced; for an NNX model (its ``nnx.split`` graph definition and state) by graph surgery on a
fresh copy (``nnx_sites``). Both work under ``jit``, ``grad`` and ``vmap``; everything above
the seam (the two passes, add-ons, lesions, site discovery) is written once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gattanet_jax import nnx_sites
from gattanet_jax.nnx_backbone import NNXBackbone


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    """One attention site: module path, 'conv' or 'dense', and its output shape without batch.
    ``input_shape``: the shape (without batch) of the module's first argument, where it is an
    array (what a module replacing the site receives; see ``intercept_sites(replace=True)``)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    input_shape: tuple[int, ...] | None = dataclasses.field(default=None, compare=False)

    @property
    def channels(self) -> int:
        return self.shape[-1]

    @property
    def code(self) -> str:
        """The site's letter in the paper's lesion notation."""
        return "c" if self.kind == "conv" else "d"


def module_name(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


@contextlib.contextmanager
def intercept_sites(
    names: Sequence[str], fn: Callable[[str, jax.Array], jax.Array], *, replace: bool = False
) -> Iterator[dict[str, int]]:
    """Within the context, replace the output y of every site in ``names`` by ``fn(name, y)``.

    ``replace=True``: the site's module does not run at all; its output is ``fn(name, x)`` of its
    first argument x (a module standing in for a layer, e.g. GSA for a convolution). The module's
    own parameters are then never read.

    Only the outermost ``__call__`` of a module counts: where a module's ``__call__`` chains to a
    parent class's (``super().__call__``), the inner call's output is an intermediate value and
    is left alone, so each site is seen exactly once per forward pass.

    Yields a dict counting how often each site was seen; callers check it with ``check_seen``.
    """
    wanted = frozenset(names)
    seen: dict[str, int] = {n: 0 for n in names}
    active: set[int] = set()
    in_fn = [False]  # modules that ``fn`` itself applies (add-on modules) are not sites

    def call_fn(name, value):
        in_fn[0] = True
        try:
            return fn(name, value)
        finally:
            in_fn[0] = False

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or id(module) in active or in_fn[0]:
            return next_fun(*args, **kwargs)
        name = module_name(module)
        if name not in wanted:
            return next_fun(*args, **kwargs)
        seen[name] += 1
        if seen[name] > 1:
            raise ValueError(
                f"attention site {name!r} ran more than once in one forward pass; a site must "
                "be a module that is called once (a module applied twice shares its path)"
            )
        if replace:
            return call_fn(name, args[0])
        active.add(id(module))
        try:
            out = next_fun(*args, **kwargs)
        finally:
            active.discard(id(module))
        return call_fn(name, out)

    with nn.intercept_methods(interceptor):
        yield seen


def call(
    backbone,
    variables,
    images: jax.Array,
    names: Sequence[str],
    fn: Callable[[str, jax.Array], jax.Array],
    *,
    replace: bool = False,
    train: bool = False,
    rngs: dict | None = None,
    mutable: Sequence[str] | bool = (),
):
    """The seam: the backbone's forward pass on ``images`` with the output y of every site in
    ``names`` replaced by ``fn(name, y)`` (``replace``: by ``fn(name, x)`` of the site's input;
    see ``intercept_sites``). Returns (output, seen), the output being what the backbone returns,
    or (output, updates) where ``mutable`` asks for its updated statistics: for Linen, the
    collections it names (``rngs`` feeds its dropout); for NNX, any true value: the copy's
    state after the call (its dropout draws from the model's own ``nnx.Rngs``).

    ``backbone``: a Linen module (``variables`` its variables, called as ``apply(variables,
    images, train=train)``) or an NNX graph definition (``variables`` its state, called as
    ``model(images)`` after ``model.eval()`` or ``model.train()``), or an ``NNXBackbone`` (an
    NNX model driven with Linen's variables, as a Linen module is)."""
    if isinstance(backbone, NNXBackbone):
        return backbone.call(
            variables, images, names, fn, replace=replace, train=train, rngs=rngs,
            mutable=mutable,
        )  # fmt: skip
    if nnx_sites.is_nnx(backbone):
        return nnx_sites.call(
            backbone, variables, images, names, fn, replace=replace, train=train,
            mutable=bool(mutable),
        )  # fmt: skip
    with intercept_sites(names, fn, replace=replace) as seen:
        out = backbone.apply(
            variables, images, train=train, rngs=rngs or {}, mutable=list(mutable) or False
        )
    return out, seen


def check_seen(seen: Mapping[str, int]) -> None:
    missing = [n for n, c in seen.items() if c == 0]
    if missing:
        raise ValueError(f"attention sites {missing} never ran in the backbone's forward pass")


def record(apply_fn: Callable[[], jax.Array], names: Sequence[str]) -> tuple[jax.Array, dict]:
    """Runs ``apply_fn()`` and returns its output and every site's output."""
    outputs: dict[str, jax.Array] = {}

    def keep(name, y):
        outputs[name] = y
        return y

    with intercept_sites(names, keep) as seen:
        out = apply_fn()
    check_seen(seen)
    return out, outputs


def _shape(value) -> tuple[int, ...] | None:
    return tuple(value.shape) if hasattr(value, "shape") else None


def _all_module_io(backbone: nn.Module, variables, images) -> dict[str, tuple]:
    """(output shape, first argument's shape or None) of every submodule's outermost
    ``__call__``, in call order."""
    found: dict[str, tuple] = {}
    active: set[int] = set()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or id(module) in active or not module.path:
            return next_fun(*args, **kwargs)
        active.add(id(module))
        try:
            out = next_fun(*args, **kwargs)
        finally:
            active.discard(id(module))
        if hasattr(out, "shape"):
            found.setdefault(module_name(module), (_shape(out), _shape(args[0]) if args else None))
        return out

    def run(v, x):
        with nn.intercept_methods(interceptor):
            return backbone.apply(v, x)

    jax.eval_shape(run, variables, images)
    return found


def available_sites(backbone, variables, image_shape: Sequence[int]) -> dict[str, tuple]:
    """Every submodule path that could be a site, with its output shape at batch 1."""
    return {k: out for k, (out, _) in _module_io(backbone, variables, image_shape).items()}


def _module_io(backbone, variables, image_shape: Sequence[int]) -> dict[str, tuple]:
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    backbone, variables = _graph(backbone, variables)
    if nnx_sites.is_nnx(backbone):
        return nnx_sites.module_io(backbone, variables, images)
    return _all_module_io(backbone, variables, images)


def _graph(backbone, variables):
    """An ``NNXBackbone`` and its Linen variables as an NNX graph definition and state; any
    other backbone as it is."""
    if isinstance(backbone, NNXBackbone):
        return backbone.graphdef, backbone.state(variables)
    return backbone, variables


def _backbone_name(backbone) -> str:
    if isinstance(backbone, NNXBackbone):
        backbone = backbone.graphdef
    if nnx_sites.is_nnx(backbone):
        return f"the NNX model {nnx_sites.type_name(backbone)}"
    return type(backbone).__name__


def _expand(names: Sequence[str], available: Sequence[str]) -> list[str]:
    """Glob patterns ('layer*/*/bn2') become the matching module paths, in call order."""
    out: list[str] = []
    for name in names:
        if not any(ch in name for ch in "*?["):
            out.append(name)
            continue
        matches = [a for a in available if fnmatch.fnmatchcase(a, name)]
        if not matches:
            raise ValueError(f"site pattern {name!r} matches no module path")
        out.extend(matches)
    return out


def resolve_sites(
    backbone, variables, image_shape: Sequence[int], names: Sequence[str]
) -> tuple[SiteSpec, ...]:
    """SiteSpecs for ``names``, in the order given; a clear error for names that are not modules.
    A name with glob characters ('layer*/*/bn2': every block's last BatchNorm) stands for every
    module path it matches, in the order the modules run."""
    io = _module_io(backbone, variables, image_shape)
    outputs = {k: out for k, (out, _) in io.items()}
    names = _expand(names, list(outputs))
    if not names:
        raise ValueError("at least one attention site is needed")
    if len(set(names)) != len(names):
        raise ValueError(f"attention sites are listed twice: {list(names)}")
    specs = []
    graphdef, state = _graph(backbone, variables)
    functions = nnx_sites.plain_functions(graphdef, state) if nnx_sites.is_nnx(graphdef) else {}
    for name in names:
        if name in functions:
            raise ValueError(
                f"attention site {name!r} is a plain function ({functions[name]}), not a module: "
                "its output cannot be reached; name the module whose output it is applied to "
                "(or make it a module). Available sites (module paths of "
                f"{_backbone_name(backbone)}): {', '.join(outputs)}"
            )
        if name not in outputs:
            close = difflib.get_close_matches(name, list(outputs), n=3)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"unknown attention site {name!r}.{hint} Available sites (module paths of "
                f"{_backbone_name(backbone)}): {', '.join(outputs)}"
            )
        shape = outputs[name][1:]
        if len(shape) == 3:
            kind = "conv"
        elif len(shape) == 1:
            kind = "dense"
        else:
            raise ValueError(
                f"attention site {name!r} outputs shape {outputs[name]}; a site must output "
                "(batch, H, W, C) (conv) or (batch, C) (dense)"
            )
        inp = io[name][1]
        specs.append(SiteSpec(name, kind, tuple(shape), inp[1:] if inp else None))
    return tuple(specs)


def lesion_mask(lesion: str | None, sites: Sequence[SiteSpec]) -> tuple[bool, ...]:
    """Parses the paper's lesion notation into one flag per site (True = modulated).

    One character per site, in site order: 'c' (a conv site) or 'd' (a dense site) keeps the
    site's modulation, '.' removes it. ``None`` modulates every site. A removed site still sends
    its query to q_avg; it only receives no modulation.
    """
    expected = "".join(s.code for s in sites)
    if lesion is None:
        return (True,) * len(sites)
    if not isinstance(lesion, str) or len(lesion) != len(sites):
        raise ValueError(
            f"lesion {lesion!r} must have one character per site ({len(sites)} sites, "
            f"full model {expected!r})"
        )
    flags = []
    for ch, site in zip(lesion, sites, strict=True):
        if ch == ".":
            flags.append(False)
        elif ch == site.code:
            flags.append(True)
        else:
            raise ValueError(
                f"lesion {lesion!r}: character {ch!r} at site {site.name!r} ({site.kind}) must be "
                f"{site.code!r} or '.'; the full model is {expected!r}"
            )
    return tuple(flags)


def lesion_string(mask: Sequence[bool], sites: Sequence[SiteSpec]) -> str:
    return "".join(s.code if m else "." for m, s in zip(mask, sites, strict=True))


def as_mask_array(mask: Sequence[bool]) -> np.ndarray:
    return np.asarray(mask, dtype=np.float32)
