"""The masked autoencoder (vitcourse.mae): masking, the loss and the hand-over to a classifier.

Every claim is checked against an independent computation: the masked positions against the
tokens the encoder actually receives, the loss and the normalised target against loops over
pixels, the decoder's unshuffling against the tokens written out position by position.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vitcourse import VisionTransformer, ViTConfig
from vitcourse.mae import MAE, patchify, random_masking, sincos_pos_embed, unpatchify

CONFIG = ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, heads=2, mlp_dim=64, num_classes=3)
N = 16  # (16 / 4) ** 2 patches


def _images(seed: int = 0, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _one_sentence(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and text.endswith(".")
    return text


# --------------------------------------------------------------------------- random masking


@pytest.mark.parametrize("n, ratio, keep", [(16, 0.75, 4), (10, 0.5, 5), (7, 0.3, 4), (9, 0.0, 9), (5, 0.7, 1)])
def test_masking_keeps_exactly_the_unmasked_tokens(n, ratio, keep):
    b, d = 4, 3
    ids = torch.arange(n, dtype=torch.float32)
    tokens = ids[None, :, None].expand(b, n, d) + 100 * torch.arange(b)[:, None, None]  # token value = its index
    visible, mask, ids_restore = random_masking(tokens, ratio, _gen(1))
    assert visible.shape == (b, keep, d) and mask.shape == (b, n) and ids_restore.shape == (b, n)
    assert mask.sum(dim=1).tolist() == [n - keep] * b
    for i in range(b):
        kept = {int(v) - 100 * i for v in visible[i, :, 0]}
        assert len(kept) == keep
        assert kept == {j for j in range(n) if mask[i, j] == 0}  # what is visible is exactly what is not masked
        assert all(mask[i, j] == 1 for j in range(n) if j not in kept)


def test_ids_restore_inverts_the_shuffle_drawn_from_the_noise():
    tokens = torch.randn(5, 12, 2)
    visible, mask, ids_restore = random_masking(tokens, 0.5, _gen(7))
    shuffle = torch.rand(5, 12, generator=_gen(7)).argsort(dim=1)  # the same draw, sorted by hand
    for i in range(5):
        assert sorted(ids_restore[i].tolist()) == list(range(12))  # a permutation
        for j in range(12):
            assert shuffle[i, ids_restore[i, j]] == j  # undoing the shuffle puts token j back at j
        assert_close(visible[i], tokens[i, shuffle[i, :6]])  # the first half of the shuffled order is kept
        unshuffled = tokens[i, shuffle[i]][ids_restore[i]]
        assert_close(unshuffled, tokens[i])
    assert len({tuple(ids_restore[i].tolist()) for i in range(5)}) > 1  # one mask per image, not one per batch


def test_masking_is_reproducible_with_a_generator():
    tokens = torch.randn(2, 16, 4)
    first = random_masking(tokens, 0.75, _gen(3))
    again = random_masking(tokens, 0.75, _gen(3))
    other = random_masking(tokens, 0.75, _gen(4))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize("tokens, ratio, message", [
    (torch.zeros(2, 16, 4), 1.0, "mask_ratio is the fraction of patches to hide and must be in [0, 1), got 1.0."),
    (torch.zeros(2, 16, 4), -0.1, "must be in [0, 1), got -0.1."),
    (torch.zeros(2, 16, 4), 0.99, "mask_ratio=0.99 keeps int(16 * (1 - 0.99)) = int(0.16000000000000014) = 0 of 16"),
    # floating point: 1 - 0.8 is a hair below 0.2, so 5 patches keep int(0.9999999999999998) = 0, as in MAE's code
    (torch.zeros(2, 5, 4), 0.8, "keeps int(5 * (1 - 0.8)) = int(0.9999999999999998) = 0 of 5 patches; lower it"),
    (torch.zeros(16, 4), 0.5, "tokens must have shape (B, N, D), got (16, 4)."),
])
def test_masking_refuses_bad_inputs_in_one_sentence(tokens, ratio, message):
    with pytest.raises(ValueError) as err:
        random_masking(tokens, ratio)
    assert message in _one_sentence(err)


# --------------------------------------------------------------------------- patches and positions


def test_patchify_round_trips_and_matches_the_patch_embedding_order():
    images = _images()
    patches = patchify(images, 4)
    assert patches.shape == (3, N, 4 * 4 * 3)
    assert torch.equal(unpatchify(patches, 4, 3), images)
    for n in range(N):  # patch n is row n // 4, column n % 4, flattened as (row in patch, column in patch, channel)
        r, c = divmod(n, 4)
        assert torch.equal(patches[:, n], images[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].permute(0, 2, 3, 1)
                           .reshape(3, -1))
    embed = MAE(CONFIG).patch_embed  # token n of the encoder is a linear map of target row n
    weight = embed.proj.weight.permute(0, 2, 3, 1).reshape(CONFIG.dim, -1)  # (D, P*P*C) in (p1 p2 c) order
    assert_close(embed(images), patches @ weight.T + embed.proj.bias, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="N a square number") as err:
        unpatchify(patches[:, :15], 4, 3)
    _one_sentence(err)


def test_sincos_positions_by_hand():
    table = sincos_pos_embed(16, 3)
    assert table.shape == (1, 10, 16)
    assert torch.equal(table[0, 0], torch.zeros(16))  # the CLS token has no position
    for n in range(9):
        row, col = divmod(n, 3)
        for half, coord in ((0, row), (8, col)):
            for k in range(4):
                angle = coord / 10000 ** (k / 4)
                assert table[0, 1 + n, half + k].item() == pytest.approx(math.sin(angle), abs=1e-6)
                assert table[0, 1 + n, half + 4 + k].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert len({tuple(r.tolist()) for r in table[0, 1:]}) == 9  # every patch has its own position
    with pytest.raises(ValueError, match="dim must be a multiple of 4, got 18") as err:
        sincos_pos_embed(18, 3)
    _one_sentence(err)


# --------------------------------------------------------------------------- the encoder sees only what is kept


def test_encoder_runs_on_the_visible_patches_only():
    model = MAE(CONFIG).eval()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    images = _images()
    latent, mask, _ = model.forward_encoder(images, 0.75, _gen(0))
    assert seen == [(3, 1 + 4, CONFIG.dim)] and latent.shape == (3, 5, CONFIG.dim)
    # repaint every hidden patch: the encoder cannot tell
    hidden = unpatchify(mask[..., None].expand(-1, -1, 48), 4, 3).bool()
    repainted = torch.where(hidden, torch.randn_like(images), images)
    latent_again, mask_again, _ = model.forward_encoder(repainted, 0.75, _gen(0))
    assert torch.equal(mask, mask_again)
    assert_close(latent_again, latent)


def test_decoder_puts_mask_tokens_at_the_masked_positions():
    model = MAE(CONFIG, decoder_depth=0).eval()  # no decoder blocks: each output row sees one input row only
    with torch.no_grad():
        model.decoder_norm.weight.add_(torch.randn(64))  # make the norm non-trivial
        latent, mask, ids_restore = model.forward_encoder(_images(), 0.75, _gen(2))
        pred = model.forward_decoder(latent, ids_restore)
        shuffle = ids_restore.argsort(dim=1)
        for i in range(3):
            for n in range(N):
                if mask[i, n]:
                    token = model.mask_token[0, 0]
                else:  # the latent row of patch n: its place in the shuffled order, after CLS
                    token = model.decoder_embed(latent[i, 1 + int((shuffle[i] == n).nonzero())])
                row = model.decoder_pred(model.decoder_norm(token + model.decoder_pos_embed[0, 1 + n]))
                assert_close(pred[i, n], row, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the loss


def _target_by_hand(images: torch.Tensor, normalise: bool) -> list[list[list[float]]]:
    """Per image, per patch (row-major), the pixels in (row in patch, column in patch, channel) order."""
    out = []
    for img in images.tolist():
        rows = []
        for r in range(4):
            for c in range(4):
                pixels = [img[ch][4 * r + i][4 * c + j] for i in range(4) for j in range(4) for ch in range(3)]
                if normalise:
                    mean = sum(pixels) / len(pixels)
                    var = sum((p - mean) ** 2 for p in pixels) / (len(pixels) - 1)  # unbiased
                    pixels = [(p - mean) / math.sqrt(var + 1e-6) for p in pixels]
                rows.append(pixels)
        out.append(rows)
    return out


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_equals_the_hand_computation(norm_pix_loss):
    model = MAE(CONFIG, norm_pix_loss=norm_pix_loss)
    images = (_images(5) * 0.5 + 0.3).double()
    model = model.double()
    loss, pred, mask = model(images, 0.75, _gen(5))
    target = _target_by_hand(images, norm_pix_loss)
    total, count = 0.0, 0
    for i in range(3):
        for n in range(N):
            if mask[i, n] == 1:
                diffs = [(p - t) ** 2 for p, t in zip(pred[i, n].tolist(), target[i][n])]
                total += sum(diffs) / len(diffs)
                count += 1
    assert count == 3 * 12
    assert loss.item() == pytest.approx(total / count, rel=1e-10)


def test_norm_pix_target_matches_the_hand_computation():
    images = _images(6).double()
    assert_close(MAE(CONFIG, norm_pix_loss=True).target(images), torch.tensor(_target_by_hand(images, True),
                                                                               dtype=torch.float64))
    assert_close(MAE(CONFIG).target(images), torch.tensor(_target_by_hand(images, False), dtype=torch.float64))


def test_loss_depends_only_on_the_masked_patches_predictions():
    model = MAE(CONFIG).eval()
    images = _images(7)
    with torch.no_grad():
        loss, pred, mask = model(images, 0.75, _gen(7))
        kept, hidden = (mask == 0)[..., None], (mask == 1)[..., None]
        noise = torch.randn_like(pred)
        assert torch.equal(model.reconstruction_loss(images, pred + noise * kept, mask), loss)
        assert model.reconstruction_loss(images, pred + noise * hidden, mask) != loss
        for i, n in ((0, int(mask[0].argmax())), (2, int(mask[2].argmax()))):  # one masked patch at a time
            nudged = pred.clone()
            nudged[i, n] += 0.1
            assert model.reconstruction_loss(images, nudged, mask) != loss


def test_a_few_steps_reduce_the_loss_on_a_tiny_batch():
    torch.manual_seed(0)
    model = MAE(CONFIG, decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=True)
    images = _images(8, batch=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    with torch.no_grad():
        before = float(model(images, 0.75, _gen(0))[0])
    for step in range(20):
        loss, _, _ = model(images, 0.75, _gen(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(model(images, 0.75, _gen(0))[0])  # the same masks as `before`
    assert after < 0.8 * before


def test_seeded_runs_are_identical():
    results = []
    for _ in range(2):
        torch.manual_seed(11)
        model = MAE(CONFIG)
        results.append((model.state_dict(), *model(_images(9), 0.75, _gen(9))))
    (state_a, loss_a, pred_a, mask_a), (state_b, loss_b, pred_b, mask_b) = results
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(loss_a, loss_b) and torch.equal(pred_a, pred_b) and torch.equal(mask_a, mask_b)


# --------------------------------------------------------------------------- from the MAE to a classifier


def test_to_vit_copies_the_encoder_so_features_match():
    torch.manual_seed(1)
    model = MAE(CONFIG)
    with torch.no_grad():  # move the encoder off its initial values (zero biases, unit norms)
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    vit = model.to_vit()
    assert isinstance(vit, VisionTransformer) and not vit.training and vit.config == CONFIG
    images = _images(10)
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(images, 0.0, _gen(10))
        assert not mask.any() and latent.shape == (3, 1 + N, CONFIG.dim)
        in_order = latent[:, 1:].gather(1, ids_restore[..., None].expand(-1, -1, CONFIG.dim))
        features = vit.forward_features(images)
    assert_close(features[:, 0], latent[:, 0])  # the CLS token
    assert_close(features[:, 1:], in_order)  # every patch token, once unshuffled
    encoder = model.encoder_state_dict()
    assert set(encoder) == set(vit.state_dict()) - {"head.weight", "head.bias"}
    for name, tensor in encoder.items():
        assert torch.equal(vit.state_dict()[name], tensor), name
    assert vit.pos_embed.requires_grad  # the fixed positions become a learned parameter for fine-tuning
    probe = model.to_vit(num_classes=7)
    assert probe.head.out_features == 7 and probe.config.num_classes == 7
    assert probe(images).shape == (3, 7)


@pytest.mark.parametrize("build, message", [
    (lambda: MAE(ViTConfig(**{**CONFIG.to_dict(), "lsa": True})), "vitcourse.mae.MAE has no shifted patch"),
    (lambda: MAE(ViTConfig(**{**CONFIG.to_dict(), "distilled": True})), "distilled=True"),
    (lambda: MAE(ViTConfig(**{**CONFIG.to_dict(), "dim": 30, "heads": 2})), "multiple of 4, got 30"),
    (lambda: MAE(CONFIG, decoder_dim=30, decoder_heads=4), "decoder_dim=30 is not divisible by decoder_heads=4."),
    (lambda: MAE(CONFIG, decoder_depth=-1), "decoder_depth must be an integer of at least 0, got -1."),
    (lambda: MAE(CONFIG, decoder_heads=0), "decoder_heads must be an integer of at least 1, got 0."),
    (lambda: MAE(ViTConfig(image_size=4, patch_size=1, in_channels=1, dim=8, depth=1, heads=2, mlp_dim=8),
                 norm_pix_loss=True), "needs at least two pixel values per patch"),
    (lambda: MAE(CONFIG)(_images(), 0.0), "no patch is masked, so there is nothing to reconstruct"),
    (lambda: MAE(CONFIG)(torch.zeros(2, 3, 32, 32)), "expected 16x16 images, got 32x32"),
    (lambda: MAE(CONFIG).reconstruction_loss(_images(), torch.zeros(3, N, 47), torch.ones(3, N)),
     "pred must have shape (3, 16, 48) and mask (3, 16), got (3, 16, 47) and (3, 16)."),
])
def test_bad_inputs_are_refused_in_one_sentence(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert message in _one_sentence(err)
