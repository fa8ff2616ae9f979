"""The exercises added to chapters 5-8 (5.4, 6.4, 7.6, 8.4): the model answers pass every public and
hidden check whatever the instructor's salt, and trivial or half-right answers fail the checks meant
to catch them. Runs the checks in-process, as ``check()`` does, without the sandbox."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitcourse.grading import runtime
from vitcourse.grading.spec import find_exercise, hidden_folder, load_hidden, seed_for

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SALTS = ("", "term 2", "resit")


@functools.cache
def solution_cells(name: str) -> tuple[str, ...]:
    """The imports and answer cells of a solution notebook (what grading runs)."""
    nb = json.loads((NOTEBOOKS / "solutions" / f"{name}_exercises.ipynb").read_text())
    sources = ["".join(cell["source"]) for cell in nb["cells"] if cell["cell_type"] == "code"]
    return tuple(s for s in sources if "### BEGIN SOLUTION" in s or s.startswith(("import", "from")))


def solution_namespace(name: str) -> dict:
    namespace: dict = {}
    for source in solution_cells(name):
        exec(source, namespace)  # noqa: S102 - the course's own solution code
    return namespace


def outcomes(exercise_id: str, namespace: dict, salt: str = "") -> dict[str, str | None]:
    """``{check description: None or the comparison's sentence}`` for every public and hidden check."""
    chapter, exercise = find_exercise(exercise_id)
    checks = [(c, False, i) for i, c in enumerate(exercise.public)]
    checks += [(c, True, i) for i, c in enumerate(load_hidden(chapter.name, hidden_folder()).get(exercise_id, []))]
    assert len(checks) >= 4, f"{exercise_id} should have public and several hidden checks"
    found = {}
    for chk, hidden, index in checks:
        case = chk.build(seed_for(chapter.name, exercise_id, index, hidden, salt))
        runtime.seed_all(0)
        try:
            value = runtime.to_plain(runtime.evaluate(runtime.decode(runtime.encode(case.task)), namespace))
        except Exception as err:  # noqa: BLE001 - a wrong answer may raise; that is a failed check
            found[chk.description] = f"raised {type(err).__name__}: {err}"
            continue
        found[chk.description] = case.compare(value, case.expected)
    return found


def failed(found: dict) -> set[str]:
    return {description for description, problem in found.items() if problem is not None}


@pytest.fixture(autouse=True)
def one_thread():
    """As in the sandbox: one thread (several threads on a busy machine make the training checks crawl)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- 5.4 train a classifier


@pytest.mark.parametrize("exercise_id", ["5.4", "6.4", "7.6", "8.4"])
def test_the_model_answer_passes_every_check_whatever_the_salt(exercise_id):
    namespace = solution_namespace(f"ch{int(exercise_id.split('.')[0]):02d}")
    for salt in SALTS:
        assert not failed(outcomes(exercise_id, namespace, salt)), salt


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


class _Standardise(nn.Module):
    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6

    def forward(self, x):
        return (x - self.mean) / self.std


def _mlp(dim: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, classes))


class _Constant(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(classes))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


TRIVIAL_5_4 = {
    "untrained": lambda x, y, k, steps: nn.Sequential(_Standardise(x), _mlp(x.shape[1], k)),
    "constant (best class frequency)": lambda x, y, k, steps: _fit(_Constant(k), x, y, steps),
}
HALF_RIGHT_5_4 = {  # answer -> the checks it must fail (at least)
    "a trained linear model": (lambda x, y, k, steps: _fit(nn.Sequential(_Standardise(x), nn.Linear(x.shape[1], k)),
                                                            x, y, steps),
                               {"two rings in the plane, 100 steps", "three rings in the plane", "XOR clusters in 3-D"}),
    "an MLP without normalisation": (lambda x, y, k, steps: _fit(_mlp(x.shape[1], k), x, y, steps),
                                     {"inputs with a tiny scale and a large offset"}),
    "normalising the training points only": (
        lambda x, y, k, steps: _fit(_mlp(x.shape[1], k), (x - x.mean(0)) / x.std(0), y, steps),
        {"inputs with a tiny scale and a large offset"}),
}


@pytest.mark.parametrize("name", TRIVIAL_5_4)
def test_5_4_trivial_answers_fail_every_check(name):
    found = outcomes("5.4", {"train_classifier": TRIVIAL_5_4[name]})
    assert failed(found) == set(found), found
    assert all("held-out accuracy" in problem for problem in found.values())


def test_5_4_wrong_shapes_are_named():
    found = outcomes("5.4", {"train_classifier": lambda x, y, k, steps: nn.Linear(x.shape[1], k + 1)})
    assert all(problem.startswith("expected logits of shape (512,") for problem in found.values()), found


# ---------------------------------------------------------------- 6.4 the gain of a block


def _block(state: dict):
    """The ULTIMUS block as a function of its state_dict, for one vector or a batch."""
    def linear(name, v):
        return v @ state[f"{name}.weight"].T + state[f"{name}.bias"]

    def block(v):
        q, k, val = linear("q", v), linear("k", v), linear("v", v)
        am = torch.softmax(q[..., :, None] * k[..., None, :], dim=-1) / q.shape[-1] ** 0.5
        return linear("out", (val[..., None, :] @ am)[..., 0, :])

    return block


def _jacobians(state, x, residual):
    block = _block(state)
    return torch.stack([torch.autograd.functional.jacobian(lambda v: v + block(v) if residual else block(v), v)
                        for v in x])


HALF_RIGHT_6_4 = {
    "the Frobenius norm": (lambda s, x, residual=False: torch.linalg.matrix_norm(_jacobians(s, x, residual)),
                           {"four examples, the block's initial weights, no residual path"}),
    "the residual path forgotten": (lambda s, x, residual=False: torch.linalg.matrix_norm(_jacobians(s, x, False), 2),
                                    {"with the residual path", "a single example, other sizes, with the residual path"}),
    "one gain for the whole batch": (
        lambda s, x, residual=False: torch.linalg.matrix_norm(_jacobians(s, x, residual), 2).max(),
        {"four examples, the block's initial weights, no residual path", "other sizes (dim 20, attn_dim 5)"}),
    "the spread across images, out over in": (
        lambda s, x, residual=False: (_block(s)(x) + (x if residual else 0)).std(0).mean() / x.std(0).mean()
        * torch.ones(len(x)), {"four examples, the block's initial weights, no residual path"}),
    "the scale inside the softmax": (
        lambda s, x, residual=False: torch.linalg.matrix_norm(_jacobians(
            {**s, "q.weight": s["q.weight"] / s["q.weight"].shape[0] ** 0.5,
             "q.bias": s["q.bias"] / s["q.weight"].shape[0] ** 0.5}, x, residual), 2),
        {"four examples, the block's initial weights, no residual path", "large weights (saturated softmax rows)"}),
}


def test_6_4_an_answer_by_loops_and_full_svds_passes_every_check():
    def per_example_svd(state, x, residual=False):  # a loop of autograd Jacobians and full SVDs
        return torch.stack([torch.linalg.svdvals(j)[0] for j in _jacobians(state, x, residual)])

    assert not failed(outcomes("6.4", {"block_gain": per_example_svd}))


# ---------------------------------------------------------------- 7.6 attention over a padded batch


def _padded_attention(mask_keys="where", zero_rows=True, off_by_one=False):
    """Variants of the answer: how the padding keys are masked, whether padding rows are zeroed."""
    import jax
    import jax.numpy as jnp

    def answer(p, x, lengths, heads):
        def one(tokens, length):
            n, dim = tokens.shape
            hd = dim // heads
            real = jnp.arange(n) <= length if off_by_one else jnp.arange(n) < length
            q, k, v = (tokens @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(n, 3, heads, hd).transpose(1, 2, 0, 3)
            scores = q @ k.transpose(0, 2, 1) / jnp.sqrt(hd)
            if mask_keys == "where":
                weights = jax.nn.softmax(jnp.where(real, scores, -jnp.inf), axis=-1)
            elif mask_keys == "additive":  # a large negative number instead of -inf: also right
                weights = jax.nn.softmax(scores - 1e9 * (1 - real), axis=-1)
            elif mask_keys == "after softmax":  # zero the weights, then renormalise: underflows
                weights = jax.nn.softmax(scores, axis=-1) * real
                weights = weights / weights.sum(-1, keepdims=True)
            else:
                weights = jax.nn.softmax(scores, axis=-1)
            out = (weights @ v).transpose(1, 0, 2).reshape(n, dim) @ p["proj"]["kernel"] + p["proj"]["bias"]
            return jnp.where(real[:, None], out, 0.0) if zero_rows else out

        return jax.vmap(one)(x, lengths)

    return answer


PUBLIC_7_6 = "3 sequences of at most 6 tokens, D = 16, 4 heads"
HALF_RIGHT_7_6 = {
    "no mask": (_padded_attention(mask_keys=None), {PUBLIC_7_6, "large values in the padding", "a single head"}),
    "padding rows not zeroed": (_padded_attention(zero_rows=False), {PUBLIC_7_6, "a single head"}),
    "masked after the softmax": (_padded_attention(mask_keys="after softmax"), {"large values in the padding"}),
    "one padding token too many": (_padded_attention(off_by_one=True), {PUBLIC_7_6, "large values in the padding"}),
}


def test_7_6_an_additive_mask_passes_every_check():
    assert not failed(outcomes("7.6", {"padded_attention": _padded_attention(mask_keys="additive")}))


# ---------------------------------------------------------------- 8.4 layer-wise learning-rate decay


def _groups(layer_of, exponent=lambda layer, n: n + 1 - layer, decayed=lambda name, shape: len(shape) > 1
            and name not in ("cls_token", "pos_embed")):
    """An answer with one group per parameter, built from the given rules."""

    def answer(shapes, num_layers, lr, decay, weight_decay):
        return [{"params": [name], "lr": lr * decay ** exponent(layer_of(name, num_layers), num_layers),
                 "weight_decay": weight_decay if decayed(name, shape) else 0.0} for name, shape in shapes.items()]

    return answer


def _layer(name, num_layers):
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return 0 if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed") else num_layers + 1


PUBLIC_8_4 = "a ViT of 4 blocks, decay 0.75"
HALF_RIGHT_8_4 = {
    "the block number read from one character": (
        _groups(lambda name, n: int(name[7]) + 1 if name.startswith("blocks.") else _layer(name, n)),
        {"12 blocks (two-digit block numbers), decay 0.65"}),
    "the head decayed once too": (_groups(_layer, exponent=lambda layer, n: n + 2 - layer),
                                  {PUBLIC_8_4, "a single block, decay 0.5"}),
    "no decay at all": (_groups(_layer, exponent=lambda layer, n: 0), {PUBLIC_8_4, "a single block, decay 0.5"}),
    "weight decay on the position embedding and the CLS token": (
        _groups(_layer, decayed=lambda name, shape: len(shape) > 1), {PUBLIC_8_4}),
    "the embeddings counted as the rest": (
        _groups(lambda name, n: int(name.split(".")[1]) + 1 if name.startswith("blocks.") else n + 1), {PUBLIC_8_4}),
    "the number of blocks counted from the names": (
        lambda shapes, n, *rest: _groups(_layer)(shapes, len({k.split(".")[1] for k in shapes
                                                             if k.startswith("blocks.")}), *rest),
        {"only blocks 2 to 5, the final norm and the head trainable"}),
}


def test_8_4_one_group_per_parameter_passes_every_check():
    assert not failed(outcomes("8.4", {"layer_decay_groups": _groups(_layer)}))  # one group per parameter is fine


def test_8_4_groups_are_compared_name_by_name_with_one_sentence():
    from vitcourse.grading.exercises.ch08 import groups_match

    compare, expected = groups_match(), {"a": (1.0, 0.0), "b": (0.5, 0.1)}
    assert compare([{"params": ["b"], "lr": 0.5, "weight_decay": 0.1}, {"params": ["a"], "lr": 1, "weight_decay": 0}],
                   expected) is None
    assert "more than one group" in compare([{"params": ["a", "a"], "lr": 1.0, "weight_decay": 0.0}], expected)
    assert compare([{"params": ["a"], "lr": 1.0, "weight_decay": 0.0}], expected) == (
        "parameters in no group: 1; names in a group that are not parameters: 0")
    assert "wrong learning rate, for example 'b'" in compare(
        [{"params": ["a"], "lr": 1.0, "weight_decay": 0.0}, {"params": ["b"], "lr": 0.4, "weight_decay": 0.1}], expected)
    assert compare({"a": (1.0, 0.0)}, expected).startswith("expected a list of groups")


# ---------------------------------------------------------------- all four: half-right answers

HALF_RIGHT = {"5.4": ("train_classifier", HALF_RIGHT_5_4), "6.4": ("block_gain", HALF_RIGHT_6_4),
              "7.6": ("padded_attention", HALF_RIGHT_7_6), "8.4": ("layer_decay_groups", HALF_RIGHT_8_4)}


@pytest.mark.parametrize("exercise_id, name", [(ex, name) for ex, (_, cases) in HALF_RIGHT.items() for name in cases])
def test_half_right_answers_fail_the_checks_meant_for_them(exercise_id, name):
    answer_name, cases = HALF_RIGHT[exercise_id]
    answer, must_fail = cases[name]
    found = outcomes(exercise_id, {answer_name: answer})
    assert must_fail <= failed(found), found
