import pytest
import torch
from torch.testing import assert_close

from vitcourse.analysis import attention_rollout, cls_attention, mean_attention_distance


def _random_attention(b, h, t):
    return torch.softmax(torch.randn(b, h, t, t), dim=-1)


def test_cls_attention_reshapes_row_zero():
    w = _random_attention(2, 3, 17)
    grid = cls_attention(w)
    assert grid.shape == (2, 3, 4, 4)
    assert_close(grid[1, 2, 1, 3], w[1, 2, 0, 1 + 1 * 4 + 3])
    with pytest.raises(ValueError, match="square grid"):
        cls_attention(_random_attention(1, 1, 6))


def test_rollout_of_identity_attention_is_identity_and_rows_sum_to_one():
    eye = torch.eye(5).expand(1, 2, 5, 5)
    assert_close(attention_rollout([eye, eye, eye]), torch.eye(5)[None])
    maps = [_random_attention(2, 4, 5) for _ in range(3)]
    roll = attention_rollout(maps)
    assert_close(roll.sum(-1), torch.ones(2, 5))
    # two blocks by hand
    a = [0.5 * m.mean(1) + 0.5 * torch.eye(5) for m in maps[:2]]
    assert_close(attention_rollout(maps[:2]), a[1] @ a[0])
    with pytest.raises(ValueError):
        attention_rollout([])


def test_mean_attention_distance():
    t = 1 + 9
    only_self = torch.zeros(1, 2, t, t)
    only_self[..., torch.arange(t), torch.arange(t)] = 1.0
    assert_close(mean_attention_distance(only_self, patch_size=4), torch.zeros(2))
    uniform = torch.full((1, 1, t, t), 1.0 / t)
    # on a 3x3 grid the mean distance between two uniformly chosen cells, computed directly
    cells = torch.tensor([(i, j) for i in range(3) for j in range(3)], dtype=torch.float32)
    expected = torch.cdist(cells, cells).mean() * 2
    assert_close(mean_attention_distance(uniform, patch_size=2), expected[None])


# --------------------------------------------------------------------------- local heads

import numpy as np  # noqa: E402

from vitcourse.analysis import (  # noqa: E402
    LOCAL_FRACTION,
    attention_gain,
    centre_score,
    filter_components,
    grid_score,
    local_heads,
    position_code,
    position_code_kind,
    uniform_attention_distance,
)


def _attention(side: int, rule) -> torch.Tensor:
    """One head's attention ``(1, 1, T, T)`` on a ``side x side`` grid plus CLS: query patch i attends to the
    patches j with ``rule(distance_ij)`` equally (CLS gets nothing)."""
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    grid = np.stack([rows.ravel(), cols.ravel()], 1)
    distance = np.linalg.norm(grid[:, None] - grid[None], axis=-1)  # (N, N) in patches
    chosen = rule(distance).astype(float)
    weights = np.zeros((side * side + 1,) * 2)
    weights[0, :] = 1.0 / len(weights)
    weights[1:, 1:] = chosen / chosen.sum(1, keepdims=True)
    return torch.tensor(weights, dtype=torch.float32)[None, None]


def test_uniform_distance_is_the_mean_distance_between_two_patches():
    for side, patch in ((8, 4), (4, 8), (14, 16)):
        centres = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2) * patch
        expected = np.linalg.norm(centres[:, None] - centres[None], axis=-1).mean()  # every pair, self included
        assert_close(uniform_attention_distance(side, patch), float(expected), rtol=1e-5, atol=1e-4)


def test_a_head_is_local_only_when_it_attends_near_its_patch():
    uniform = uniform_attention_distance(8, 4)
    heads = {
        "itself": (lambda d: d == 0, True),
        "its four neighbours": (lambda d: d == 1, True),
        "everything within two patches": (lambda d: d <= 2, True),
        "every patch": (lambda d: d >= 0, False),
        "only patches at least five apart": (lambda d: d >= 5, False),
    }
    for name, (rule, is_local) in heads.items():
        distance = mean_attention_distance(_attention(8, rule), patch_size=4)  # (1,)
        assert bool(local_heads(distance, uniform)[0]) is is_local, (name, float(distance), uniform)
    just = torch.tensor([LOCAL_FRACTION * uniform - 1e-3, LOCAL_FRACTION * uniform + 1e-3])
    assert local_heads(just, uniform).tolist() == [True, False]  # the threshold is exactly the fraction
    with pytest.raises(ValueError, match="between 0 and 1"):
        local_heads(just, uniform, fraction=1.5)


def test_attention_gain_words_cover_every_range():
    assert [attention_gain(g) for g in (5.0, 3.0, 2.9, 1.5, 1.49, 0.8)] == [
        "few patches", "few patches", "more concentrated", "more concentrated", "hardly", "hardly"]
    with pytest.raises(ValueError, match="positive ratio"):
        attention_gain(float("nan"))


def test_filter_components_are_the_principal_directions_of_the_filters():
    torch.manual_seed(0)
    weight = torch.randn(40, 3, 4, 4)
    pcs = filter_components(weight, 5)
    assert pcs.shape == (5, 3, 4, 4) and float(pcs.min()) == 0.0 and float(pcs.max()) == 1.0
    # independent reference: eigenvectors of the filters' covariance matrix, up to sign and the [0, 1] scaling
    flat = weight.flatten(1).double()
    flat = flat - flat.mean(0)
    _, vectors = torch.linalg.eigh(flat.T @ flat)
    for k in range(5):
        v = vectors[:, -1 - k]
        for signed in (v, -v):
            scaled = (signed - signed.min()) / (signed.max() - signed.min())
            if torch.allclose(scaled.float(), pcs[k].flatten(), atol=1e-4):
                break
        else:
            raise AssertionError(f"component {k} is not the covariance's eigenvector")


# --------------------------------------------------------------------------- what positional embeddings encode

SIDE, DIM = 8, 96
ROWS, COLS = np.divmod(np.arange(SIDE * SIDE), SIDE)


def _grid_code(seed: int) -> torch.Tensor:
    """Rows and columns as 2-D waves: similarity depends only on the offset between two positions."""
    w = np.random.default_rng(seed).normal(0, 0.6, (DIM // 2, 2))
    phase = np.stack([ROWS, COLS], 1) @ w.T  # (N, DIM/2)
    return torch.tensor(np.concatenate([np.cos(phase), np.sin(phase)], 1))


def _centre_code(seed: int, radius=None) -> torch.Tensor:
    """Each position's vector is a function of its distance from the centre only, plus a little noise."""
    rng = np.random.default_rng(seed)
    radius = np.hypot(ROWS - 3.5, COLS - 3.5) if radius is None else radius
    features = np.cos(radius[:, None] * rng.normal(0, 0.8, DIM) + rng.uniform(0, 2 * np.pi, DIM))
    return torch.tensor(features + 0.1 * rng.normal(size=(SIDE * SIDE, DIM)))


def _random_code(seed: int) -> torch.Tensor:
    return torch.tensor(np.random.default_rng(seed).normal(size=(SIDE * SIDE, DIM)))


def _reference_partial_correlation(y, x, groups):
    """Correlation of y and x after regressing both on one indicator column per group (least squares)."""
    labels = np.unique(groups)
    design = (groups[:, None] == labels[None]).astype(float)
    ry = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    rx = x - design @ np.linalg.lstsq(design, x, rcond=None)[0]
    return float(ry @ rx / np.sqrt((ry @ ry) * (rx @ rx)))


def test_the_scores_are_partial_correlations_over_the_pairs_they_describe():
    embedding = _grid_code(0) + 0.5 * _centre_code(1)
    unit = torch.nn.functional.normalize(embedding, dim=-1)
    sim = (unit @ unit.T).numpy()
    pairs = [(i, j) for i in range(SIDE * SIDE) for j in range(i + 1, SIDE * SIDE)]
    centre = np.array([3.5, 3.5])
    place = [np.array([r, c]) - centre for r, c in zip(ROWS, COLS)]

    def orbit(k):  # the position's place relative to the centre, up to the square's 8 symmetries
        return tuple(sorted(np.abs(place[k])))

    s = np.array([sim[i, j] for i, j in pairs])
    distance = np.array([np.linalg.norm(place[i] - place[j]) for i, j in pairs])
    gap = np.array([abs(np.linalg.norm(place[i]) - np.linalg.norm(place[j])) for i, j in pairs])
    placement = np.array([hash(tuple(sorted((orbit(i), orbit(j))))) for i, j in pairs])
    offset = np.round(distance ** 2).astype(int)
    assert grid_score(embedding) == pytest.approx(-_reference_partial_correlation(s, distance, placement), abs=1e-9)
    assert centre_score(embedding) == pytest.approx(-_reference_partial_correlation(s, gap, offset), abs=1e-9)
    # the CLS position (first of N + 1) is dropped, with or without the batch axis
    with_cls = torch.cat([torch.randn(1, DIM, dtype=embedding.dtype), embedding])
    assert grid_score(with_cls[None]) == pytest.approx(grid_score(embedding))
    with pytest.raises(ValueError, match="square grid"):
        grid_score(torch.randn(1, 7, DIM))


@pytest.mark.parametrize("seed", range(4))
def test_position_code_tells_a_grid_from_a_centre_border_code_from_noise(seed):
    cases = {
        "grid": _grid_code(seed),
        "centre": _centre_code(seed),
        # a centre-versus-border code in the other sense: only how many patches a position lies from the border
        "centre_ring": _centre_code(seed, radius=np.minimum.reduce([ROWS, COLS, SIDE - 1 - ROWS, SIDE - 1 - COLS])
                                    .astype(float)),
        "both": torch.cat([_grid_code(seed), _centre_code(seed + 10)], 1),
        "neither": _random_code(seed),
    }
    for name, embedding in cases.items():
        code = position_code(embedding)
        assert code.kind == name.removesuffix("_ring"), (name, code)
        assert code.grid_null[1] > 0 and code.centre_null[1] > 0
    grid = position_code(_grid_code(seed))
    assert grid.grid > 0.5 and abs(grid.centre) < 0.1 and abs(grid.grid_null[0]) < 0.02
    # the bar is z shuffled standard deviations above the shuffled mean: just below the score's own z, just above
    own_z = (grid.grid - grid.grid_null[0]) / grid.grid_null[1]
    assert position_code(_grid_code(seed), z=0.99 * own_z).grid_verdict == "higher"
    assert position_code(_grid_code(seed), z=1.01 * own_z).grid_verdict == "noise"


def test_vit_initial_positions_read_as_neither():
    # the course's initialisation (trunc-normal, std 0.02) of a ViT's positions: independent random vectors
    from vitcourse import VisionTransformer, ViTConfig

    for seed in range(6):
        torch.manual_seed(seed)
        model = VisionTransformer(ViTConfig(image_size=32, patch_size=4, dim=96, depth=1, heads=4, mlp_dim=192))
        assert position_code(model.pos_embed).kind == "neither", seed


def test_position_code_kind_covers_every_verdict_pair():
    expected = {("higher", "higher"): "both", ("higher", "noise"): "grid", ("noise", "higher"): "centre",
                ("noise", "noise"): "neither", ("lower", "noise"): "reversed", ("higher", "lower"): "reversed",
                ("lower", "lower"): "reversed", ("noise", "lower"): "reversed", ("lower", "higher"): "reversed"}
    for (g, c), kind in expected.items():
        assert position_code_kind(g, c) == kind
    with pytest.raises(ValueError, match="verdicts"):
        position_code_kind("up", "noise")
    with pytest.raises(ValueError, match="2 shuffles"):
        position_code(_random_code(0), shuffles=1)
