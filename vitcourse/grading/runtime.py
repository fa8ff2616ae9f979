"""Tasks: what the grader asks a student's code to compute, as small JSON trees.

A check never sends code to the student process. It sends a *task*: a tree of
nodes naming the student's functions and classes and the grader-chosen inputs::

    call("softmax", arr(x), dim=-1)                       # softmax(x, dim=-1)
    apply(new("MultiHeadSelfAttention", 32, 4, state=w),  # build, load weights,
          arr(tokens))                                    # run forward(tokens)
    num_params(new("VisionTransformer", cfg))             # count parameters

The student process evaluates the tree in the namespace its notebook defined
(:func:`evaluate`), turns the result into plain NumPy and Python values
(:func:`to_plain`) and sends them back; the grader compares them with its own
expected values. The public :func:`vitcourse.grading.check` evaluates the same
trees in the student's own kernel.

Node reference (every node is a dict with one ``$`` key):

========================  ======================================================
``arr(x, as_="torch")``   an input array; ``as_`` is ``torch``, ``numpy`` or ``jax``
``call(name, *a, **k)``   call the student's function ``name``
``new(name, *a, state=None, **k)``  build the student's class ``name``; load the
                          ``state_dict`` ``state`` (strict) if given; ``eval()`` mode
``apply(obj, *a, **k)``   ``obj(*a, **k)`` (a module's forward)
``method(obj, m, *a, **k)``  ``getattr(obj, m)(*a, **k)``
``num_params(obj)``       ``sum(p.numel() for p in obj.parameters())``
``state_shapes(obj)``     ``{name: list(shape)}`` of ``obj.state_dict()``
========================  ======================================================

Imported inside the sandbox: standard library and NumPy at import time only.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from .wire import MAX_ARRAY_ELEMENTS, decode_value

__all__ = [
    "arr", "call", "new", "apply", "method", "num_params", "state_shapes",
    "evaluate", "to_plain", "pack_tree", "Unsupported",
]


# --- building tasks (grader side) ------------------------------------------------


def arr(x, as_: str = "torch") -> dict:
    """An input array ``x`` (NumPy or torch), handed to the student as a ``torch``/``numpy``/``jax`` array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return {"$arr": np.asarray(x), "as": as_}


def call(name: str, *args, **kwargs) -> dict:
    """Call the student's function ``name(*args, **kwargs)``."""
    return {"$call": name, "args": list(args), "kwargs": kwargs}


def new(name: str, *args, state: dict | None = None, **kwargs) -> dict:
    """Build the student's class ``name(*args, **kwargs)``, load ``state`` (a state_dict of ``arr``), ``eval()``."""
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


def pack_tree(tree, blobs: list[bytes]):
    """Replace every array in ``tree`` by an index into ``blobs`` (``.npy`` bytes), for sending."""
    from .wire import array_to_bytes

    if isinstance(tree, np.ndarray):
        blobs.append(array_to_bytes(tree))
        return {"$npy": len(blobs) - 1}
    if isinstance(tree, dict):
        return {k: pack_tree(v, blobs) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [pack_tree(v, blobs) for v in tree]
    return tree


# --- evaluating tasks (student side) -----------------------------------------------


class Unsupported(TypeError):
    """The student's code returned something that is not an array, number, list or dict."""


def _lookup(namespace: dict, name: str):
    if name not in namespace:
        raise NameError(f"{name} is not defined in the notebook (was its cell deleted, renamed or not run?)")
    return namespace[name]


def _as_array(node: dict, blobs: list[bytes] | None):
    value = node["$arr"]
    if isinstance(value, dict):  # {"$npy": i} after travelling
        value = decode_value(value, blobs or [])
    value = np.array(value)  # a private copy the student may modify freely
    kind = node.get("as", "torch")
    if kind == "numpy":
        return value
    if kind == "jax":
        import jax.numpy as jnp

        return jnp.asarray(value)
    import torch

    return torch.from_numpy(value)


def evaluate(tree, namespace: dict, blobs: list[bytes] | None = None):
    """Evaluate a task ``tree`` against the student's ``namespace``; return the raw result."""
    ev = lambda t: evaluate(t, namespace, blobs)  # noqa: E731
    if isinstance(tree, list):
        return [ev(t) for t in tree]
    if not isinstance(tree, dict):
        return tree
    if "$arr" in tree:
        return _as_array(tree, blobs)
    if "$call" in tree:
        fn = _lookup(namespace, tree["$call"])
        return fn(*ev(tree["args"]), **{k: ev(v) for k, v in tree["kwargs"].items()})
    if "$new" in tree:
        cls = _lookup(namespace, tree["$new"])
        obj = cls(*ev(tree["args"]), **{k: ev(v) for k, v in tree["kwargs"].items()})
        if tree.get("state") is not None:
            state = {k: ev(v) for k, v in tree["state"].items()}
            obj.load_state_dict(state, strict=True)
        if hasattr(obj, "eval"):
            obj.eval()
        return obj
    if "$apply" in tree:
        return ev(tree["$apply"])(*ev(tree["args"]), **{k: ev(v) for k, v in tree["kwargs"].items()})
    if "$method" in tree:
        obj = ev(tree["on"])
        return getattr(obj, tree["$method"])(*ev(tree["args"]), **{k: ev(v) for k, v in tree["kwargs"].items()})
    if "$num_params" in tree:
        return int(sum(p.numel() for p in ev(tree["$num_params"]).parameters()))
    if "$state_shapes" in tree:
        return {k: list(v.shape) for k, v in ev(tree["$state_shapes"]).state_dict().items()}
    return {k: ev(v) for k, v in tree.items()}


def seed_all(seed: int = 0) -> None:
    """Seed Python, NumPy and (if imported) torch before each task, so dropout-free code is deterministic."""
    import sys

    random.seed(seed)
    np.random.seed(seed)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def to_plain(value, depth: int = 0) -> Any:
    """Turn a task result into NumPy arrays, numbers, strings, lists and dicts.

    Tensors (torch, JAX, NumPy) become NumPy arrays; tuples become lists.
    Anything else raises :class:`Unsupported` naming its type.
    """
    if depth > 20:
        raise Unsupported("the result is nested too deeply")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value[:1000] if isinstance(value, str) else value
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor
        value = value.detach().cpu()
        if value.dtype.is_floating_point and value.dtype.itemsize < 4:
            value = value.float()
        value = value.numpy()
    elif not isinstance(value, np.ndarray) and hasattr(value, "__array__") and hasattr(value, "shape"):
        value = np.asarray(value)  # JAX and other array types
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise Unsupported(f"an array of dtype {value.dtype}, not numbers")
        if value.size > MAX_ARRAY_ELEMENTS:
            raise Unsupported(f"an array of shape {value.shape}, too large to compare")
        return value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Size":
        return [to_plain(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v, depth + 1) for k, v in value.items()}
    raise Unsupported(f"a {type(value).__name__}")
