"""The training run's timeline arithmetic (raypipe.train_timeline.phase_seconds): phases and the start-up figure."""

from raypipe.train_timeline import phase_seconds


def test_phases_are_differences_of_consecutive_marks():
    marks = [("build_start", 100.0), ("prepare", 101.5), ("ray_init", 105.0), ("worker_start", 112.0),
             ("first_batch", 113.0), ("first_step", 113.25), ("epoch_1_train", 120.0)]
    phases = phase_seconds(marks)
    assert phases["prepare"] == 1.5
    assert phases["ray_init"] == 3.5
    assert phases["worker_start"] == 7.0
    assert phases["first_step"] == 0.25
    assert phases["epoch_1_train"] == 6.75
    assert phases["startup"] == 13.25  # first mark to the first optimizer step
    assert "build_start" not in phases  # the first mark only starts the clock


def test_repeated_names_add_up_and_no_step_means_no_startup():
    marks = [("start", 0.0), ("val", 1.0), ("train", 3.0), ("val", 4.5)]
    phases = phase_seconds(marks)
    assert phases == {"val": 2.5, "train": 2.0}  # no first_step mark (failed before it): no start-up claimed
    assert phase_seconds([]) == {}
