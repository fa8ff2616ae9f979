"""Tasks: what a check asks the student's code to compute, as small JSON-able trees.

A check never sends code to the student process; it sends a tree naming the student's
functions and classes and the grader's inputs::

    call("softmax", arr(x), dim=-1)                                 # softmax(x, dim=-1)
    apply(new("MultiHeadSelfAttention", 32, 4, state=w), arr(tokens))  # build, load w, forward
    num_params(new("VisionTransformer", cfg))                       # count parameters

:func:`evaluate` runs a tree against the notebook's namespace (in the sandbox, or in the
student's kernel for ``check()``); :func:`to_plain` turns the result into NumPy arrays,
numbers, strings, lists and dicts; :func:`encode` and :func:`decode` carry those as JSON,
arrays as base64 ``.npy`` read back without pickles and with a size cap.
Imported inside the sandbox: standard library and NumPy only (torch and JAX lazily).
"""

from __future__ import annotations

import base64
import io
import random
import sys

import numpy as np

MAX_ELEMENTS = 20_000_000
"""Largest array (in elements) a result may hold."""


def arr(x, as_: str = "torch") -> dict:
    """An input array (NumPy or torch) handed to the student as ``torch``, ``numpy`` or ``jax``."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return {"$arr": np.asarray(x), "as": as_}


def call(name: str, *args, **kwargs) -> dict:
    """Call the student's function ``name(*args, **kwargs)``."""
    return {"$call": name, "args": list(args), "kwargs": kwargs}


def new(name: str, *args, state: dict | None = None, **kwargs) -> dict:
    """Build the student's class ``name(*args, **kwargs)``, load ``state`` (strict) if given, ``eval()``."""
    return {"$new": name, "args": list(args), "kwargs": kwargs, "state": state}


def apply(obj: dict, *args, **kwargs) -> dict:
    """Call a built object: ``obj(*args, **kwargs)``."""
    return {"$apply": obj, "args": list(args), "kwargs": kwargs}


def method(obj: dict, name: str, *args, **kwargs) -> dict:
    """Call a method of a built object: ``obj.name(*args, **kwargs)``."""
    return {"$method": name, "on": obj, "args": list(args), "kwargs": kwargs}


def num_params(obj: dict) -> dict:
    """The number of scalar parameters of a built module."""
    return {"$num_params": obj}


def state_shapes(obj: dict) -> dict:
    """``{name: shape}`` of a built module's ``state_dict()``."""
    return {"$state_shapes": obj}


class Unsupported(TypeError):
    """The student's code returned something that is not an array, number, string, list or dict."""


def _lookup(namespace: dict, name: str):
    if name not in namespace:
        raise NameError(f"{name} is not defined in the notebook (was its cell deleted, renamed or not run?)")
    return namespace[name]


def _input(node: dict):
    value = np.array(decode(node["$arr"]))  # a private copy the student may change
    if node.get("as") == "numpy":
        return value
    if node.get("as") == "jax":
        import jax.numpy as jnp

        return jnp.asarray(value)
    import torch

    return torch.from_numpy(value)


def evaluate(tree, namespace: dict):
    """Evaluate a task tree against the student's ``namespace``; return the raw result."""
    def ev(t):
        return evaluate(t, namespace)

    def args(t):
        return ev(t["args"]), {k: ev(v) for k, v in t["kwargs"].items()}

    if isinstance(tree, list):
        return [ev(t) for t in tree]
    if not isinstance(tree, dict):
        return tree
    if "$arr" in tree:
        return _input(tree)
    if "$call" in tree:
        a, k = args(tree)
        return _lookup(namespace, tree["$call"])(*a, **k)
    if "$new" in tree:
        a, k = args(tree)
        obj = _lookup(namespace, tree["$new"])(*a, **k)
        if tree.get("state") is not None:
            obj.load_state_dict({key: ev(v) for key, v in tree["state"].items()}, strict=True)
        return obj.eval() if hasattr(obj, "eval") else obj
    if "$apply" in tree:
        a, k = args(tree)
        return ev(tree["$apply"])(*a, **k)
    if "$method" in tree:
        a, k = args(tree)
        return getattr(ev(tree["on"]), tree["$method"])(*a, **k)
    if "$num_params" in tree:
        return int(sum(p.numel() for p in ev(tree["$num_params"]).parameters()))
    if "$state_shapes" in tree:
        return {k: list(v.shape) for k, v in ev(tree["$state_shapes"]).state_dict().items()}
    return {k: ev(v) for k, v in tree.items()}


def seed_all(seed: int = 0) -> None:
    """Seed Python, NumPy and (if imported) torch, so dropout-free code is deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def to_plain(value, depth: int = 0):
    """A result as NumPy arrays (from torch, JAX or NumPy), numbers, strings, lists and dicts."""
    if depth > 20:
        raise Unsupported("a result nested too deeply")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value[:1000] if isinstance(value, str) else value
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor
        value = value.detach().cpu()
        value = (value.float() if value.dtype.is_floating_point and value.dtype.itemsize < 4 else value).numpy()
    elif not isinstance(value, np.ndarray) and hasattr(value, "__array__") and hasattr(value, "shape"):
        value = np.asarray(value)  # JAX
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise Unsupported(f"an array of dtype {value.dtype}, not numbers")
        if value.size > MAX_ELEMENTS:
            raise Unsupported(f"an array of shape {value.shape}, too large to compare")
        return value
    if isinstance(value, (list, tuple)):
        return [to_plain(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v, depth + 1) for k, v in value.items()}
    raise Unsupported(f"a {type(value).__name__}")


def encode(value):
    """A plain value (or task tree) as JSON-able data, arrays as ``{"$npy": base64}``."""
    if isinstance(value, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        return {"$npy": base64.b64encode(buffer.getvalue()).decode()}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def _array(text) -> np.ndarray:
    raw = base64.b64decode(text, validate=True)
    f = io.BytesIO(raw)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f, max_header_size=1000)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if dtype.kind not in "biuf" or count > MAX_ELEMENTS or count * dtype.itemsize != len(raw) - f.tell():
        raise ValueError("an array that is not plain numbers of the size its header states")
    return np.frombuffer(raw, dtype, count, f.tell()).reshape(shape, order="F" if fortran else "C").copy()


def decode(value, depth: int = 0):
    """Inverse of :func:`encode`; raises ``ValueError`` for anything malformed, deep or oversized."""
    if depth > 40:
        raise ValueError("a value nested too deeply")
    if isinstance(value, dict):
        if set(value) == {"$npy"}:
            return _array(value["$npy"])
        return {str(k): decode(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v, depth + 1) for v in value]
    if isinstance(value, np.ndarray) or value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"an unexpected {type(value).__name__}")
