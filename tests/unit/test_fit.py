from __future__ import annotations

import pytest
import torch

from residual import (
    FitCancelledError,
    FitConfig,
    FitError,
    LinearisedLN,
    apply_fused,
    class_embeddings,
    extract_batched,
    fit,
    fuse,
    resolve,
    stratified_split,
    zero_shot_logits,
)
from residual.tiny import tasks
from residual.tiny.reference import reference_basis


@pytest.fixture(scope="module")
def fit_task(tiny):
    """Cached features of a slice of the count task (zero-shot leaves the most room there) on the shipped model."""
    task = tasks.TASKS["count"]
    out = {}
    for split, n in (("train", 600), ("val", 150), ("test", 200)):
        images, labels, _ = tasks.task_images("count", split, n=n)
        raw, emb = extract_batched(tiny, tiny.pixels_from_arrays(images))
        out[split] = (raw, torch.from_numpy(labels), emb)
    cls = class_embeddings(tiny.encode_text, tiny.tokenizer, task.classes, task.templates)
    return task, out, cls, reference_basis(tiny), LinearisedLN(tiny)


def _fit(tiny, fit_task, **cfg):
    task, data, cls, basis, ln = fit_task
    return fit((data["train"][0], data["train"][1]), cls, tiny.logit_scale, basis, ln, list(task.classes),
               list(task.templates), FitConfig(**cfg), val=data["val"][:2], test=data["test"][:2])


def test_full_fit_beats_zero_shot_and_reports(tiny, fit_task) -> None:
    res = _fit(tiny, fit_task, variant="full", max_epochs=20, patience=20, lr=2.0)
    rep = res.report
    assert rep["val_accuracy"] >= rep["zero_shot_val_accuracy"]
    assert rep["test_accuracy"] > rep["zero_shot_test_accuracy"] + 0.05
    assert rep["n_parameters"] == res.coefficients.lambdas.numel() == int(res.coefficients.k.sum())
    assert 1 <= rep["epochs"] <= 20 and 0 <= rep["best_epoch"] <= rep["epochs"]
    assert rep["wall_time_s"] > 0 and len(rep["history"]) == rep["epochs"] + 1


def test_fitted_set_serves_the_accuracy_it_reports(tiny, fit_task) -> None:
    """The fused serving path reproduces the accuracy measured by the fitting code."""
    task, data, cls, basis, ln = fit_task
    res = _fit(tiny, fit_task, variant="full", max_epochs=4)
    y = apply_fused(data["test"][0], fuse(resolve(res.coefficients, basis), ln), ln)
    acc = float((zero_shot_logits(y, cls, tiny.logit_scale).argmax(-1) == data["test"][1]).float().mean())
    assert acc == pytest.approx(res.report["test_accuracy"], abs=1.5 / 200)  # at most one near-tie flips


def test_fit_is_deterministic_under_a_seed(tiny, fit_task) -> None:
    a = _fit(tiny, fit_task, variant="fine", max_epochs=3, seed=4).coefficients.lambdas
    b = _fit(tiny, fit_task, variant="fine", max_epochs=3, seed=4).coefficients.lambdas
    c = _fit(tiny, fit_task, variant="fine", max_epochs=3, seed=5).coefficients.lambdas
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_early_stopping_stops_before_max_epochs(tiny, fit_task) -> None:
    rep = _fit(tiny, fit_task, variant="coarse", max_epochs=30, patience=1).report
    assert rep["epochs"] < 30
    assert rep["epochs"] - rep["best_epoch"] <= 1


@pytest.mark.parametrize("variant", ["coarse", "linear"])
def test_other_variants_run(tiny, fit_task, variant: str) -> None:
    res = _fit(tiny, fit_task, variant=variant, max_epochs=2)
    assert res.report["val_accuracy"] >= res.report["history"][0]["val_accuracy"]  # the best epoch is kept
    expected = 24 if variant == "coarse" else 128 * 128 + 128
    assert res.report["n_parameters"] == expected


def test_progress_and_cancellation(tiny, fit_task) -> None:
    task, data, cls, basis, ln = fit_task
    reports: list[dict] = []
    res = fit((data["train"][0], data["train"][1]), cls, tiny.logit_scale, basis, ln, list(task.classes),
              list(task.templates), FitConfig(variant="coarse", max_epochs=2, patience=10), val=data["val"][:2],
              progress=reports.append)
    assert [r["epoch"] for r in reports] == [1, 2] and all(r["max_epochs"] == 2 for r in reports)
    assert reports[-1]["best_val_accuracy"] == res.report["val_accuracy"]  # the last report knows the best so far
    assert [h["epoch"] for h in res.report["history"]] == [0, 1, 2]  # epoch 0: the initial coefficients
    seen: list[dict] = []
    with pytest.raises(FitCancelledError):
        fit((data["train"][0], data["train"][1]), cls, tiny.logit_scale, basis, ln, list(task.classes),
            list(task.templates), FitConfig(variant="full", max_epochs=5), val=data["val"][:2],
            progress=seen.append, should_stop=lambda: len(seen) >= 1)
    assert len(seen) == 1 and seen[0]["epoch"] == 1 and "val_accuracy" in seen[0]


def test_stratified_split_and_bad_inputs(tiny, fit_task) -> None:
    labels = torch.tensor([0] * 10 + [1] * 20)
    tr, va = stratified_split(labels, 0.2, seed=0)
    assert int((labels[va] == 0).sum()) == 2 and int((labels[va] == 1).sum()) == 4
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(tr) + len(va) == 30
    task, data, cls, basis, ln = fit_task
    with pytest.raises(FitError, match="labels"):
        fit((data["train"][0], data["train"][1] + 10), cls, tiny.logit_scale, basis, ln, list(task.classes),
            list(task.templates))
    with pytest.raises(FitError, match="2 classes"):
        fit((data["train"][0], torch.zeros_like(data["train"][1])), cls, tiny.logit_scale, basis, ln,
            list(task.classes), list(task.templates))


def test_the_report_names_the_deliberate_deviations(tiny, fit_task) -> None:
    task, data, cls, basis, ln = fit_task
    kept = _fit(tiny, fit_task, variant="full", max_epochs=1, patience=1, lr=1e-9)  # lr too small to move lambdas
    assert kept.report["best_epoch"] == 0
    assert any("best_epoch 0" in d for d in kept.report["deviations"])
    assert torch.equal(kept.coefficients.lambdas, torch.ones_like(kept.coefficients.lambdas))  # the initial ones
    linear = _fit(tiny, fit_task, variant="linear", max_epochs=1, patience=1)
    assert any("identity" in d for d in linear.report["deviations"])
    no_mean = _fit(tiny, fit_task, variant="full", max_epochs=1, patience=1, add_mean=False)
    assert any("outside its stored basis" in d for d in no_mean.report["deviations"])


@pytest.mark.parametrize(("variant", "lr", "zero_shot_start"), [
    ("full", 0.8, True), ("linear", 1e-3, True), ("coarse", 0.8, False), ("fine", 0.8, False)])
def test_report_names_its_learning_rate_and_starting_point(tiny, fit_task, variant, lr, zero_shot_start) -> None:
    """The default learning rate is reported as used (not null); coarse and fine say that epoch 0 is not zero-shot,
    and for full and linear epoch 0 is exactly the zero-shot accuracy."""
    rep = _fit(tiny, fit_task, variant=variant, max_epochs=1).report
    assert rep["lr"] == rep["config"]["lr"] == lr
    assert rep["starting_point"].startswith("zero-shot" if zero_shot_start else "not zero-shot")
    epoch0 = rep["history"][0]["val_accuracy"]
    if zero_shot_start:
        assert epoch0 == pytest.approx(rep["zero_shot_val_accuracy"], abs=1 / 150)
    else:
        assert variant in rep["starting_point"] and "dropped" in rep["starting_point"]
