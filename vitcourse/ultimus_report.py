"""Chapter 6's sentences: which measured verdict picks which sentence.

Every sentence that chapter 6 writes from its runs is chosen here, from a small dict keyed on a
verdict of :mod:`vitcourse.stats` (``"higher"``, ``"lower"``, ``"noise"``) or on a plain measured
condition, so that each branch has a unit test (``tests/test_ch06_verdicts.py``) and the page shows
numbers, not prose builders. Accuracies are fractions in ``[0, 1]``; an
:class:`~vitcourse.stats.Estimate` is a mean over seeds with its standard error (seeds and
validation images both counted, see :func:`vitcourse.stats.seed_estimate`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from .stats import Estimate, Verdict, compare, difference, noise_floor

__all__ = [
    "LOSS_TOLERANCE",
    "accuracy",
    "versus",
    "chance_verdict",
    "cifar_status",
    "reproduction",
    "last_block_rows",
    "colour_sentence",
    "blocks_alone",
    "modern_sentence",
    "summary_blocks",
    "summary_stem",
    "summary_both",
]

LOSS_TOLERANCE = 0.05
"""How close to ``ln C`` a final validation loss must stay to count as "the loss did not move"."""


def accuracy(e: Estimate) -> str:
    """``"53.2% ± 2.1"``: a mean accuracy and its standard error, in percent and points."""
    return f"{100 * e.mean:.1f}% ± {100 * e.se:.1f}"


def chance_verdict(e: Estimate, chance: float) -> Verdict:
    """Is the accuracy ``e`` above the chance line ``chance`` by more than its own noise?

    The chance line is a fixed number (no error of its own), so this is
    ``stats.compare(e, Estimate(chance, 0.0))``.
    """
    return compare(e, Estimate(chance, 0.0))


_VERSUS = {
    "higher": "{d:.1f} points above {name} (the noise floor is {f:.1f})",
    "lower": "{d:.1f} points below {name} (the noise floor is {f:.1f})",
    "noise": "not separated from {name} by these seeds ({sd:+.1f} points, inside the noise floor of {f:.1f})",
}


def versus(a: Estimate, b: Estimate, name: str) -> str:
    """How ``a`` compares with ``b`` (called ``name``), by :func:`vitcourse.stats.compare`, as a phrase."""
    d = difference(a, b)
    return _VERSUS[compare(a, b)].format(d=abs(100 * d.mean), sd=100 * d.mean, f=100 * noise_floor(a, b), name=name)


_CIFAR = {
    "on_disk": "CIFAR-10 itself was on the machine that built this page, so the commands at the end run as they are.",
    "download": ("CIFAR-10 itself was not on the machine that built this page; the commands at the end download it "
                 "on first use, where the internet can be reached."),
    "offline": ("CIFAR-10 itself was not on the machine that built this page, and downloads were off there "
                "(`VITCOURSE_OFFLINE` was set), so the commands at the end need its files copied in first."),
}


def cifar_status(on_disk: bool, downloads_allowed: bool) -> str:
    """Whether the page's closing commands can run as they are, from what the building machine had."""
    return _CIFAR["on_disk" if on_disk else "download" if downloads_allowed else "offline"]


_REPRODUCES = {
    # (every loss within LOSS_TOLERANCE of ln C, some peak above chance) -> (headline, note)
    (True, False): ("The failure reproduces",
                    "Every run's loss ends within {tol} of $\\ln 10$, and at neither peak is the accuracy ({accs}) "
                    "above the chance line of {chance} by more than its noise."),
    (True, True): ("The failure reproduces in the loss",
                   "Every run's loss ends within {tol} of $\\ln 10$, but at peak {above} the accuracy ({accs}) is "
                   "above the chance line of {chance} by more than its noise: the logits still depend on the image "
                   "enough to pick the right class on a few more images than luck would."),
    (False, False): ("The failure reproduces in the accuracy",
                     "At neither peak is the accuracy ({accs}) above the chance line of {chance} by more than its "
                     "noise, but the run at peak {worst} ends {drop:.2f} below $\\ln 10$: its logits depend on the "
                     "image a little, not enough to pick the right class more often than luck."),
    (False, True): ("The failure reproduces only in part",
                    "The run at peak {worst} ends {drop:.2f} below $\\ln 10$ and at peak {above} the accuracy "
                    "({accs}) is above the chance line of {chance} by more than its noise: on this data the "
                    "specification learns a little. Step 4 measures how little, next to the repairs."),
}


def reproduction(losses: Mapping[str, Sequence[float]], accuracies: Mapping[str, Estimate], chance: float,
                 ln_c: float) -> tuple[str, str]:
    """Does the published failure (loss at ``ln C``, accuracy at chance) reproduce? ``(headline, note)``.

    Args:
        losses: peak label -> final validation loss of every seed.
        accuracies: peak label -> seed estimate of the final validation accuracy.
        chance: the page's chance line.
        ln_c: ``ln`` of the number of classes.
    """
    drops = {(peak, i): ln_c - loss for peak, values in losses.items() for i, loss in enumerate(values)}
    (worst, _), drop = max(drops.items(), key=lambda item: item[1])
    above = [peak for peak, e in accuracies.items() if chance_verdict(e, chance) == "higher"]
    headline, note = _REPRODUCES[(drop < LOSS_TOLERANCE, bool(above))]
    accs = " and ".join(f"{accuracy(e)} at peak {peak}" for peak, e in accuracies.items())
    return headline, note.format(tol=LOSS_TOLERANCE, accs=accs, chance=f"{100 * chance:.1f}%",
                                 above=" and ".join(above), worst=worst, drop=drop)


def last_block_rows(first_entropy: float, last_entropy: float) -> str:
    """What training did to the last block's attention rows, from the row entropies (shares of ``ln 8``)."""
    if last_entropy > 0.9:
        return f"stayed uniform ({last_entropy:.1%})"
    if last_entropy > first_entropy:
        return f"sharpened less ({last_entropy:.0%})"
    return f"sharpened at least as much ({last_entropy:.0%})"


_COLOUR = {
    "higher": ("So the average colour does say a little about the class here, although every colour is drawn at "
               "random: a linear classifier that sees only the three average colour values of each image reaches "
               "{acc:.1%} on the validation images, above the chance line of {chance:.1%}."),
    "noise": ("A linear classifier that sees only the three average colour values of each image reaches {acc:.1%} "
              "on the validation images, not above the chance line of {chance:.1%} by more than its noise: on this "
              "data the average colour says nothing usable about the class."),
    "lower": ("A linear classifier that sees only the three average colour values of each image reaches {acc:.1%} "
              "on the validation images, below the chance line of {chance:.1%}: on this data the average colour "
              "says nothing usable about the class."),
}


def colour_sentence(colour: Estimate, chance: float) -> str:
    """What a classifier of the average colour alone reached, against the chance line."""
    return _COLOUR[chance_verdict(colour, chance)].format(acc=colour.mean, chance=chance)


_BLOCKS = {
    "none": "None of the {n} changes to the blocks alone ({names}) lifts the accuracy above the chance line of "
            "{chance} by more than its noise; the highest mean is {best_acc} ({best}).",
    "some": "Of the {n} changes to the blocks alone, {above} end{s} above the chance line of {chance} by more "
            "than {its} noise ({above_accs}); {others} do{es} not ({other_accs}).",
    "all": "All {n} changes to the blocks alone end above the chance line of {chance} by more than their "
           "noise ({above_accs}).",
}
_BLOCKS_VS_REPAIRED = {
    "lower": "Even the best of them, {best}, is {d:.1f} points below the repaired network (noise floor {f:.1f}): "
             "repairing the blocks alone is not enough.",
    "noise": "The seeds cannot tell the best of them, {best}, from the repaired network ({sd:+.1f} points, inside "
             "the noise floor of {f:.1f}).",
    "higher": "The best of them, {best}, even ends {d:.1f} points above the repaired network (noise floor {f:.1f}).",
}


def _status(verdicts: Mapping[str, Verdict]) -> str:
    above = sum(v == "higher" for v in verdicts.values())
    return "none" if above == 0 else "all" if above == len(verdicts) else "some"


def blocks_alone(blocks: Mapping[str, Estimate], repaired: Estimate, chance: float) -> str:
    """Two sentences on the repairs of the blocks alone: against chance, then the best against the repaired net."""
    verdicts = {name: chance_verdict(e, chance) for name, e in blocks.items()}
    above = [name for name, v in verdicts.items() if v == "higher"]
    others = [name for name in blocks if name not in above]
    best = max(blocks, key=lambda name: blocks[name].mean)
    first = _BLOCKS[_status(verdicts)].format(
        n=len(blocks), names=", ".join(blocks), chance=f"{100 * chance:.1f}%", best=best,
        best_acc=accuracy(blocks[best]), above=" and ".join(above), s="" if len(above) > 1 else "s",
        its="their" if len(above) > 1 else "its", above_accs=", ".join(accuracy(blocks[n]) for n in above),
        others=" and ".join(others), es="" if len(others) > 1 else "es",
        other_accs=", ".join(accuracy(blocks[n]) for n in others))
    d = difference(blocks[best], repaired)
    second = _BLOCKS_VS_REPAIRED[compare(blocks[best], repaired)].format(
        best=best, d=abs(100 * d.mean), sd=100 * d.mean, f=100 * noise_floor(blocks[best], repaired))
    return f"{first} {second}"


_MODERN = {
    "higher": "helps further",
    "noise": "makes no difference these seeds can see",
    "lower": "costs accuracy on this budget",
}


def modern_sentence(modern: Estimate, repaired: Estimate) -> str:
    """The summary's sentence on adding the scale inside the softmax and LayerNorm to the repaired network."""
    d = difference(modern, repaired)
    return (f"Moving the scale inside the softmax and adding LayerNorm {_MODERN[compare(modern, repaired)]} "
            f"({100 * modern.mean:.1f}% against {100 * repaired.mean:.1f}%, a difference of {100 * d.mean:+.1f} "
            f"points against a noise floor of {100 * noise_floor(modern, repaired):.1f}).")


_SUMMARY_BLOCKS = {
    "none": "Repairing the blocks alone leaves the network at chance",
    "some": "Repairing the blocks alone lifts the network above chance only with {above}, to {best_acc} at most",
    "all": "Every repair of the blocks alone lifts the network above chance, to {best_acc} at most",
}


def summary_blocks(blocks: Mapping[str, Estimate], chance: float) -> str:
    """The summary's clause on the repairs of the blocks alone."""
    verdicts = {name: chance_verdict(e, chance) for name, e in blocks.items()}
    above = [name for name, v in verdicts.items() if v == "higher"]
    best = max(blocks.values(), key=lambda e: e.mean)
    return _SUMMARY_BLOCKS[_status(verdicts)].format(above=" and ".join(above), best_acc=f"{100 * best.mean:.1f}%")


_SUMMARY_STEM = {
    "higher": "repairing the stem alone (BatchNorm + ReLU) lifts it to {acc}",
    "noise": "repairing the stem alone (BatchNorm + ReLU) changes nothing these seeds can see ({acc})",
    "lower": "repairing the stem alone (BatchNorm + ReLU) lowers it, to {acc}",
}


def summary_stem(stem: Estimate, spec: Estimate) -> str:
    """The summary's clause on the stem repair alone, against the specification."""
    return _SUMMARY_STEM[compare(stem, spec)].format(acc=f"{100 * stem.mean:.1f}%")


_SUMMARY_BOTH = {
    ("higher", "higher"): "the two together, a nonlinear stem and a residual path, reach {acc}, above either alone",
    ("higher", "noise"): "the two together reach {acc}, above the stem repair alone but not separated by these "
                         "seeds from the residual path alone",
    ("noise", "higher"): "the two together reach {acc}, above the residual path alone but not separated by these "
                         "seeds from the stem repair alone",
    ("noise", "noise"): "the two together reach {acc}, which these seeds do not separate from either alone",
}


def summary_both(repaired: Estimate, stem: Estimate, residual: Estimate) -> str:
    """The summary's clause on the repaired network against each of its two repairs alone.

    A verdict of ``"lower"`` (the pair below one of its parts) is worded like ``"noise"`` plus that fact.
    """
    vs_stem, vs_res = compare(repaired, stem), compare(repaired, residual)
    key = (vs_stem if vs_stem != "lower" else "noise", vs_res if vs_res != "lower" else "noise")
    text = _SUMMARY_BOTH[key].format(acc=f"{100 * repaired.mean:.1f}%")
    below = [name for name, v in (("the stem repair alone", vs_stem), ("the residual path alone", vs_res))
             if v == "lower"]
    if below:
        text += f", and below {' and '.join(below)}"
    return text
