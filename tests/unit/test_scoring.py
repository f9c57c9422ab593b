"""Which tasks are scored by value, and the three accuracies a run reports."""
import pytest

from cotmi_ds.data import DATASETS, TASK_KINDS, task_kind
from cotmi_ds.data.datasets import DSS_DATASETS
from cotmi_ds.evaluation.results import select_accuracies
from cotmi_ds.evaluation.scoring import exact_match, numeric_match, scorer_for


def test_equation_datasets_are_scored_by_value():
    for dataset in ("svamp", "synthetic"):
        assert task_kind(dataset) == "numeric"
        score = scorer_for(task_kind(dataset))
        assert score("( 84.0 / 2.0 )", "( 84 / 2 )")
        assert score("( 21 * 2 )", "( 84.0 / 2.0 )")
        assert not score("( 84.0 / 3.0 )", "( 84.0 / 2.0 )")
        assert not score("__import__('os')", "( 84.0 / 2.0 )")
        assert not score("( 1 / 0 )", "( 1 / 0 )")


def test_other_datasets_are_scored_by_exact_match():
    assert {d: task_kind(d) for d in ("esnli", "anli1", "cqa")} == {"esnli": "exact", "anli1": "exact", "cqa": "choice"}
    for kind in ("exact", "choice"):
        assert scorer_for(kind) is exact_match
    with pytest.raises(KeyError):
        scorer_for("unknown")
    assert exact_match(" neutral ", "neutral")
    assert not exact_match("( 4 / 2 )", "( 2 / 1 )")
    assert numeric_match("( 4 / 2 )", "( 2 / 1 )")


def _ev(step, valid, test):
    return {"step": step, "valid": {"accuracy": valid}, "test": {"accuracy": test}}


def test_last_best_test_and_best_valid_are_different_evaluations():
    history = [_ev(250, 0.50, 0.40), _ev(500, 0.70, 0.55), _ev(750, 0.60, 0.62), _ev(1000, 0.65, 0.58)]
    assert select_accuracies(history) == {
        "accuracy_last": 0.58, "step_last": 1000,
        "accuracy_best_test": 0.62, "step_best_test": 750,
        "accuracy_at_best_valid": 0.55, "step_at_best_valid": 500, "valid_accuracy_at_best_valid": 0.70,
    }


def test_ties_go_to_the_earliest_evaluation():
    history = [_ev(10, 0.5, 0.3), _ev(20, 0.5, 0.3), _ev(30, 0.4, 0.2)]
    s = select_accuracies(history)
    assert s["step_at_best_valid"] == 10 and s["step_best_test"] == 10 and s["step_last"] == 30
    with pytest.raises(ValueError):
        select_accuracies([])


def test_a_runs_evaluation_settings_carry_its_datasets_scorer():
    """What the trainer and `cotmi eval` pass to evaluate_split: SVAMP reaches the numeric scorer."""
    from cotmi_ds.config import load_config
    from cotmi_ds.evaluation.generate import evaluation_settings

    assert evaluation_settings(load_config(dataset="svamp"))["scorer"] is numeric_match
    assert evaluation_settings(load_config(dataset="synthetic"))["scorer"] is numeric_match
    assert evaluation_settings(load_config(dataset="cqa"))["scorer"] is exact_match
    single = evaluation_settings(load_config(dataset="svamp", mode="single"))
    assert single["scorer"] is numeric_match and single["label_from_text"] is not None


def test_majority_baseline_is_the_most_common_training_label_scored_like_predictions():
    from datasets import Dataset

    from cotmi_ds.evaluation.generate import majority_baseline

    train = Dataset.from_dict({"label": ["( 1 + 1 )", "( 1 + 1 )", "3", "4"]})
    test = Dataset.from_dict({"label": ["2", "( 4 / 2 )", "3", "( 1 + 1 )", "5"]})
    assert majority_baseline(train, test, exact_match) == pytest.approx(1 / 5)
    assert majority_baseline(train, test, numeric_match) == pytest.approx(3 / 5)


def test_every_dataset_has_a_task_kind_with_a_scorer_and_the_registry_names_the_dss_readers():
    assert set(DATASETS) == {"synthetic", *DSS_DATASETS}
    assert {task_kind(d) for d in DATASETS} <= set(TASK_KINDS)
    assert all(callable(scorer_for(kind)) for kind in TASK_KINDS)
