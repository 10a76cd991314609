"""`--total-steps` shared out over the stages by `--stage-split` (TrainConfig.__post_init__)."""

from __future__ import annotations

import pytest

from genrecal_train.config import TrainConfig, load_config, split_steps


def test_total_steps_are_shared_by_the_split_of_the_stages_run():
    assert TrainConfig(total_steps=750).stage_steps == [30, 570, 150]  # the default 4/76/20%
    assert TrainConfig(total_steps=750, stages=[2, 3]).stage_steps == [594, 156]  # renormalised over 2 and 3
    assert TrainConfig(total_steps=10, stages=[3]).stage_steps == [10]
    assert sum(split_steps(7, [1, 2, 3], [0.01, 0.01, 0.98])) == 7  # every stage keeps a step
    assert TrainConfig(total_steps=750, stage_steps=[1, 2, 3]).stage_steps == [1, 2, 3]  # explicit steps win


@pytest.mark.parametrize("split", [[0.04, 0.76, 0.2], [0.05, 0.75, 0.2], [0.2, 0.2, 0.6], [0.49, 0.02, 0.49]])
@pytest.mark.parametrize("stages", [[1, 2, 3], [1, 3], [2, 3]])
def test_every_total_is_shared_exactly_with_a_step_per_stage(split, stages):
    for total in range(len(stages), 300):  # tiny totals once gave 7 steps for --total-steps 6
        steps = split_steps(total, stages, split)
        assert sum(steps) == total and min(steps) >= 1, (total, steps)


def test_split_from_flags_and_bad_splits():
    cfg = load_config(None, dict(cache="c", student="s", out="o", total_steps=100, stage_split="0.1,0.5,0.4"))
    assert cfg.stage_steps == [10, 50, 40]
    with pytest.raises(ValueError, match="three shares"):
        TrainConfig(total_steps=100, stage_split=[0.5, 0.5])
    with pytest.raises(ValueError, match="no steps"):
        TrainConfig(total_steps=100, stages=[1], stage_split=[0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="fewer than one step"):
        TrainConfig(total_steps=2)
