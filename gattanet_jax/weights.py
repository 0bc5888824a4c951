"""Pretrained weights in torchvision's state-dict format -> Flax variable trees.

Reading never runs code from the file: ``.pth`` / ``.pt`` files go through
``torch.load(..., weights_only=True)`` (torch is optional, needed only for them), ``.safetensors``
through ``safetensors.numpy``, ``.npz`` through ``numpy.load(allow_pickle=False)``.

Conversion walks the *model's* variable tree and looks up each leaf's torchvision name, so every
problem is found at once: names the model needs and the file lacks (missing), names in the file
the model does not use (unexpected; torchvision's ``num_batches_tracked`` counters are ignored),
and arrays whose shape does not fit (mis-shaped). Layouts: conv (O, I, kh, kw) -> (kh, kw, I, O);
linear (out, in) -> (in, out); BatchNorm weight/bias/running_mean/running_var -> scale/bias
(params) and mean/var (batch_stats).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

_LEAF = {  # (collection, Flax leaf name) -> torchvision suffix
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_IGNORED_SUFFIXES = ("num_batches_tracked",)
SUFFIXES = (".pth", ".pt", ".safetensors", ".npz")  # the weight-file formats read here


class WeightsError(ValueError):
    """The weights file cannot be read or does not fit the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torchvision-format state dict as name -> numpy array (float32 for floating arrays)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} not found")
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix in (".pth", ".pt"):
            try:
                import torch
            except ImportError:
                raise WeightsError(
                    f"reading {path} needs torch (pip install torch); or convert it once to "
                    ".safetensors or .npz, which load without torch"
                ) from None
            raw = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(raw, Mapping) and "state_dict" in raw:
                raw = raw["state_dict"]
            if not isinstance(raw, Mapping):
                raise WeightsError(f"{path} holds a {type(raw).__name__}, not a state dict")
            arrays = {k: _torch_to_numpy(k, v, path) for k, v in raw.items()}
        elif suffix == ".safetensors":
            from safetensors.numpy import load_file

            arrays = load_file(path)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        else:
            raise WeightsError(
                f"weights file {path!r}: unknown format {suffix!r}; use .pth/.pt (torch), "
                ".safetensors or .npz"
            )
    except WeightsError:
        raise
    except Exception as e:  # a corrupt or truncated file, a pickle with code in it, ...
        first = (str(e).strip().splitlines() or [""])[0]  # torch's reasons run to many lines
        raise WeightsError(
            f"cannot read weights file {path}: {type(e).__name__}: {first}"
        ) from None
    return {
        k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v)
        for k, v in arrays.items()
    }


def _torch_to_numpy(name: str, value, path: str) -> np.ndarray:
    if not hasattr(value, "is_floating_point"):
        raise WeightsError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()


def _to_flax(name: str, array: np.ndarray) -> np.ndarray:
    if name.endswith("kernel") and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if name.endswith("kernel") and array.ndim == 2:
        return array.T
    return array


def _torch_shape(leaf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A Flax leaf's shape in torchvision's layout (what the file should hold)."""
    if leaf_name == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf_name == "kernel" and len(shape) == 2:
        return shape[::-1]
    return shape


def from_torchvision(
    state_dict: Mapping[str, np.ndarray],
    abstract_variables,
    module_name: Callable[[Sequence[str]], str],
    *,
    where: str = "weights",
) -> dict:
    """The Flax variables of a model from a torchvision-format state dict.

    Args:
      state_dict: name -> array, torchvision's names and layouts.
      abstract_variables: the model's variables, or their shapes (``jax.eval_shape`` of init).
      module_name: maps a Flax module path (without collection and leaf) to the torchvision
        prefix, e.g. ``gattanet_jax.backbones.resnet.torch_name``.
      where: how the file is named in errors.
    Raises:
      WeightsError listing every missing, unexpected and mis-shaped name, every integer (or
      other non-floating) array where the model has floats, and every array holding NaN or
      infinity.
    """
    used, missing, misshaped, mistyped, nonfinite = set(), [], [], [], []

    def convert(path, leaf):
        keys = [str(getattr(k, "key", k)) for k in path]
        collection, modules, leaf_name = keys[0], keys[1:-1], keys[-1]
        suffix = _LEAF.get((collection, leaf_name))
        if suffix is None:
            raise WeightsError(f"no torchvision name for the variable {'/'.join(keys)}")
        name = f"{module_name(modules)}.{suffix}"
        want = tuple(leaf.shape)
        if name not in state_dict:
            missing.append(f"{name} {_torch_shape(leaf_name, want)}")
            return None
        used.add(name)
        value = _to_flax(leaf_name, np.asarray(state_dict[name]))
        if value.shape != want:
            needs = _torch_shape(leaf_name, want)
            misshaped.append(f"{name}: file {tuple(state_dict[name].shape)}, model needs {needs}")
            return None
        if np.issubdtype(np.dtype(leaf.dtype), np.floating) and value.dtype.kind != "f":
            mistyped.append(f"{name} is {value.dtype}, model needs floating point")
            return None
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            nonfinite.append(f"{name} ({bad} of {np.size(value)})")
            return None
        return np.asarray(value, dtype=leaf.dtype)

    out = jax.tree_util.tree_map_with_path(convert, abstract_variables)
    unexpected = [
        f"{k} {tuple(np.shape(v))}"
        for k, v in state_dict.items()
        if k not in used and not k.endswith(_IGNORED_SUFFIXES)
    ]
    problems = [
        ("missing", sorted(missing)),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
        ("of another dtype", mistyped),
        ("with non-finite values", nonfinite),
    ]
    if any(items for _, items in problems):
        parts = []
        for label, items in problems:
            if items:
                shown = "; ".join(items[:8]) + (
                    f"; and {len(items) - 8} more" if len(items) > 8 else ""
                )
                parts.append(f"{len(items)} {label}: {shown}")
        raise WeightsError(f"{where} do not fit the model: " + " | ".join(parts))
    return out
