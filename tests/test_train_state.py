"""The step loop's state and the small setup pieces around it (no model, no training)."""

import json
import math

from finetune.train import TrainState, _open_metrics, _resume


def test_a_fresh_state_is_step_zero_with_no_best_and_states_share_nothing():
    a, b = TrainState(), TrainState()
    assert (a.step, a.tokens_seen, a.stopped) == (0, 0, "max_steps")
    assert math.isnan(a.last_loss)
    assert a.best == {"cer": None, "step": None, "stale": 0}
    a.best["stale"] += 1
    assert b.best["stale"] == 0  # each state its own dict


def test_no_resume_from_gives_a_fresh_state_without_touching_anything(tmp_path):
    # Nothing but the train.resume_from value is read when it is empty.
    state = _resume("", False, tmp_path / "checkpoints", None, None, None, None, {})
    assert (state.step, state.best, state.tokens_seen) == (0, {"cer": None, "step": None, "stale": 0}, 0)


def test_metrics_keep_records_up_to_the_resumed_step_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)))
    with _open_metrics(path, 4) as fh:
        fh.write(json.dumps({"step": 5, "loss": 0.5}) + "\n")
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    with _open_metrics(path, 0):  # a fresh run starts an empty file
        pass
    assert path.read_text() == ""
