"""Hierarchical findings and plain class names map to each task's classes by rule."""

import pytest

from pneumobatch.core.tasks import get_task, task_from_card


@pytest.mark.parametrize(
    "finding, pneumonia, etiology, covid",
    [
        ("No Finding", "normal", "normal", "not-covid"),
        ("NORMAL", "normal", "normal", "not-covid"),
        ("PNEUMONIA", "pneumonia", None, "not-covid"),
        ("Pneumonia", "pneumonia", None, "not-covid"),
        ("Pneumonia/Bacterial", "pneumonia", "bacterial", "not-covid"),
        ("Pneumonia/Bacterial/Streptococcus", "pneumonia", "bacterial", "not-covid"),
        ("Pneumonia/Viral", "pneumonia", "viral", "not-covid"),
        ("Pneumonia/Viral/SARS", "pneumonia", "viral", "not-covid"),
        ("Pneumonia/Viral/COVID-19", "pneumonia", "covid-19", "covid-19"),
        ("pneumonia/viral/covid-19", "pneumonia", "covid-19", "covid-19"),
        ("Pneumonia/Fungal/Pneumocystis", "pneumonia", "fungal", "not-covid"),
        ("Pneumonia/Lipoid", "pneumonia", None, "not-covid"),
        ("ARDS", None, None, None),
        ("", None, None, None),
        ("bacterial", "pneumonia", "bacterial", "not-covid"),
        ("COVID-19", "pneumonia", "covid-19", "covid-19"),
    ],
)
def test_findings_map_to_task_classes(finding, pneumonia, etiology, covid):
    assert get_task("pneumonia").map_label(finding) == pneumonia
    assert get_task("etiology").map_label(finding) == etiology
    assert get_task("covid").map_label(finding) == covid


def test_missing_values_and_unknown_task():
    assert get_task("pneumonia").map_label(float("nan")) is None
    assert get_task("pneumonia").map_label(None) is None
    with pytest.raises(KeyError, match="known: pneumonia"):
        get_task("nope")


def test_custom_task_from_card_maps_its_own_classes():
    task = task_from_card("custom", ["cat", "dog"])
    assert task.map_label("DOG") == "dog" and task.map_label("cow") is None
    assert task_from_card("pneumonia", ["normal", "pneumonia"]) is get_task("pneumonia")
