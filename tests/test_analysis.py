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
