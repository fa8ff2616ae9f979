"""Every branch of chapter 6's sentence choices (vitcourse.ultimus_report), on estimates built to land in it."""

import math

import pytest

from vitcourse import stats
from vitcourse import ultimus_report as report

N = 1000
LN10 = math.log(10)
CHANCE = stats.guessing_bound(N, 10)


def est(*accs):
    return stats.seed_estimate(accs, N)


def test_accuracy_is_percent_and_points():
    e = est(0.50, 0.52, 0.54)
    assert report.accuracy(e) == f"{100 * e.mean:.1f}% ± {100 * e.se:.1f}"
    assert report.accuracy(e).startswith("52.0% ± ")


@pytest.mark.parametrize("accs, verdict", [((0.40, 0.42, 0.41), "higher"), ((0.11, 0.12, 0.13), "noise"),
                                          ((0.02, 0.03, 0.02), "lower")])
def test_chance_verdict(accs, verdict):
    e = est(*accs)
    assert report.chance_verdict(e, CHANCE) == verdict
    # the same rule as stats.compare against a number without error, worked out by hand
    gap = e.mean - CHANCE
    assert (abs(gap) >= 2 * e.se) == (verdict != "noise")


def test_versus_every_branch():
    a, b = est(0.50, 0.51, 0.52), est(0.30, 0.31, 0.32)
    floor = 100 * stats.noise_floor(a, b)
    assert report.versus(a, b, "B") == f"20.0 points above B (the noise floor is {floor:.1f})"
    assert report.versus(b, a, "A") == f"20.0 points below A (the noise floor is {floor:.1f})"
    c = est(0.505, 0.51, 0.515)
    text = report.versus(c, a, "A")
    assert text.startswith("not separated from A by these seeds (+0.0 points")


def test_cifar_status_every_branch():
    assert "was on the machine" in report.cifar_status(True, False)
    assert "download it" in report.cifar_status(False, True)
    assert "VITCOURSE_OFFLINE" in report.cifar_status(False, False)


def _peaks(loss_a, loss_b, acc_a, acc_b):
    return {"0.01": loss_a, "1e-3": loss_b}, {"0.01": est(*acc_a), "1e-3": est(*acc_b)}


def test_reproduction_every_branch():
    at_chance = (0.10, 0.11, 0.09)
    above = (0.30, 0.31, 0.29)
    flat = [LN10 - 0.01, LN10 + 0.02, LN10]
    fell = [LN10 - 0.3, LN10, LN10]
    headline, note = report.reproduction(*_peaks(flat, flat, at_chance, at_chance), CHANCE, LN10)
    assert headline == "The failure reproduces" and "within 0.05" in note and "at neither peak" in note
    headline, note = report.reproduction(*_peaks(flat, flat, at_chance, above), CHANCE, LN10)
    assert headline == "The failure reproduces in the loss" and "at peak 1e-3 the accuracy" in note
    headline, note = report.reproduction(*_peaks(flat, fell, at_chance, at_chance), CHANCE, LN10)
    assert headline == "The failure reproduces in the accuracy" and "peak 1e-3 ends 0.30 below" in note
    headline, note = report.reproduction(*_peaks(fell, flat, above, at_chance), CHANCE, LN10)
    assert headline == "The failure reproduces only in part"
    assert "peak 0.01 ends 0.30 below" in note and "at peak 0.01 the accuracy" in note
    # the accuracies are quoted as mean ± standard error
    assert report.accuracy(est(*above)) in note


def test_reproduction_tolerance_edge():
    just_inside = [LN10 - (report.LOSS_TOLERANCE - 1e-6)]
    just_outside = [LN10 - (report.LOSS_TOLERANCE + 1e-6)]
    acc = {"p": est(0.1)}
    assert report.reproduction({"p": just_inside}, acc, CHANCE, LN10)[0] == "The failure reproduces"
    assert report.reproduction({"p": just_outside}, acc, CHANCE, LN10)[0] == "The failure reproduces in the accuracy"


def test_last_block_rows_every_branch():
    assert report.last_block_rows(0.5, 0.95) == "stayed uniform (95.0%)"
    assert report.last_block_rows(0.5, 0.7) == "sharpened less (70%)"
    assert report.last_block_rows(0.7, 0.5) == "sharpened at least as much (50%)"
    assert report.last_block_rows(0.6, 0.6) == "sharpened at least as much (60%)"


def test_colour_sentence_every_branch():
    assert report.colour_sentence(est(0.20), CHANCE).startswith("So the average colour does say a little")
    assert "says nothing usable" in report.colour_sentence(est(0.11), CHANCE)
    assert "not above the chance line" in report.colour_sentence(est(0.11), CHANCE)
    assert "below the chance line" in report.colour_sentence(est(0.02), CHANCE)


def _blocks(a, b, c):
    return {"scale inside": est(*a), "residual": est(*b), "LayerNorm": est(*c)}


def test_blocks_alone_every_branch():
    chance, low, mid = (0.10, 0.11, 0.10), (0.11, 0.10, 0.12), (0.25, 0.26, 0.24)
    repaired = est(0.50, 0.52, 0.51)
    text = report.blocks_alone(_blocks(chance, low, chance), repaired, CHANCE)
    assert text.startswith("None of the 3 changes to the blocks alone (scale inside, residual, LayerNorm)")
    assert f"the highest mean is {report.accuracy(est(*low))} (residual)." in text
    assert "repairing the blocks alone is not enough" in text
    text = report.blocks_alone(_blocks(chance, mid, chance), repaired, CHANCE)
    assert text.startswith("Of the 3 changes to the blocks alone, residual ends above")
    assert "scale inside and LayerNorm do not" in text
    text = report.blocks_alone(_blocks(mid, mid, chance), repaired, CHANCE)
    assert "scale inside and residual end above" in text and "LayerNorm does not" in text
    text = report.blocks_alone(_blocks(mid, mid, mid), repaired, CHANCE)
    assert text.startswith("All 3 changes to the blocks alone end above")
    # the best block repair against the repaired network: lower (above), noise, higher
    text = report.blocks_alone(_blocks(chance, (0.50, 0.51, 0.52), chance), repaired, CHANCE)
    assert "cannot tell the best of them, residual, from the repaired network" in text
    text = report.blocks_alone(_blocks(chance, (0.70, 0.71, 0.72), chance), repaired, CHANCE)
    assert "even ends 20.0 points above the repaired network" in text


def test_modern_sentence_every_branch():
    repaired = est(0.50, 0.51, 0.52)
    assert "helps further" in report.modern_sentence(est(0.60, 0.61, 0.62), repaired)
    text = report.modern_sentence(est(0.505, 0.51, 0.515), repaired)
    assert "makes no difference these seeds can see" in text and "51.0% against 51.0%" in text
    assert "costs accuracy" in report.modern_sentence(est(0.40, 0.41, 0.42), repaired)


def test_summary_blocks_every_branch():
    chance, mid = (0.10, 0.11, 0.10), (0.25, 0.26, 0.24)
    assert report.summary_blocks(_blocks(chance, chance, chance), CHANCE) == \
        "Repairing the blocks alone leaves the network at chance"
    assert report.summary_blocks(_blocks(chance, mid, chance), CHANCE) == \
        "Repairing the blocks alone lifts the network above chance only with residual, to 25.0% at most"
    assert report.summary_blocks(_blocks(mid, mid, mid), CHANCE).startswith("Every repair of the blocks alone")


def test_summary_stem_every_branch():
    spec = est(0.10, 0.11, 0.10)
    assert "lifts it to 30.0%" in report.summary_stem(est(0.30, 0.31, 0.29), spec)
    assert "changes nothing these seeds can see" in report.summary_stem(est(0.10, 0.11, 0.11), spec)
    assert "lowers it" in report.summary_stem(est(0.01, 0.0, 0.01), spec)


def test_summary_both_every_branch():
    stem, residual = est(0.30, 0.31, 0.29), est(0.20, 0.21, 0.19)
    assert report.summary_both(est(0.50, 0.51, 0.49), stem, residual).endswith("above either alone")
    text = report.summary_both(est(0.40, 0.41, 0.39), stem, est(0.40, 0.40, 0.41))
    assert "above the stem repair alone but not separated by these seeds from the residual path alone" in text
    text = report.summary_both(est(0.30, 0.31, 0.29), stem, residual)
    assert "above the residual path alone but not separated by these seeds from the stem repair alone" in text
    text = report.summary_both(est(0.30, 0.31, 0.29), stem, est(0.30, 0.30, 0.31))
    assert text.endswith("which these seeds do not separate from either alone")
    text = report.summary_both(est(0.10, 0.11, 0.09), stem, residual)  # below both of its parts
    assert "below the stem repair alone and the residual path alone" in text
