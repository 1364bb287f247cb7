"""Bad input: a clear message naming the file, field or key, exit status 2, nothing written."""

import pytest

from tests.helpers import REPO, TINY, make_folder, run_cli

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs


def test_eval_missing_dataset_dir(tmp_path):
    p = run_cli("eval", "--model", TINY, "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert p.returncode == 2
    assert f"--data {tmp_path / 'nope'}: not a dataset directory" in p.stderr
    assert not (tmp_path / "out").exists()


def test_train_missing_dataset_dir(tmp_path):
    p = run_cli("train", str(REPO / "configs/runs/tiny_smoke.yaml"), f"data.path={tmp_path / 'nope'}",
                f"output_dir={tmp_path / 'run'}")
    assert p.returncode == 2 and "data.path" in p.stderr and "not a dataset directory" in p.stderr
    assert not (tmp_path / "run").exists()


def test_train_unknown_config_key(tmp_path):
    p = run_cli("train", str(REPO / "configs/runs/tiny_smoke.yaml"), "train.lerning_rate=1", f"output_dir={tmp_path / 'run'}")
    assert p.returncode == 2 and "unknown config key 'train.lerning_rate'" in p.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_model_name(tmp_path):
    make_folder(tmp_path / "scans", 10)
    assert run_cli("data", "build", "--source", "folder", "--input", str(tmp_path / "scans"), "--output",
                   str(tmp_path / "data"), "--no-progress").returncode == 0
    p = run_cli("eval", "--model", "builtin:no-such-model", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"))
    assert p.returncode == 2
    assert "unknown model 'builtin:no-such-model': builtin models are builtin:tiny-deepseek-ocr, builtin:tiny-deepseek-ocr-2, builtin:tiny-random-deepseek-ocr, builtin:tiny-random-deepseek-ocr-2" in p.stderr
    assert not (tmp_path / "out").exists()
    p = run_cli("eval", "--model", "not a model", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"))
    assert p.returncode == 2 and "unknown model 'not a model'" in p.stderr


def test_data_build_bad_source_and_existing_output(tmp_path):
    make_folder(tmp_path / "scans", 10)
    p = run_cli("data", "build", "--source", "folder", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "d"))
    assert p.returncode == 2 and "not a directory" in p.stderr
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("keep")
    p = run_cli("data", "build", "--source", "folder", "--input", str(tmp_path / "scans"), "--output", str(tmp_path / "d"))
    assert p.returncode == 2 and "already exists" in p.stderr
    assert (tmp_path / "d" / "mine.txt").read_text() == "keep"


def test_hub_id_that_cannot_be_downloaded_is_named(monkeypatch):
    import pytest

    from finetune.models import ModelNameError, resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine cannot reach the Hub anyway
    with pytest.raises(ModelNameError, match="model 'someone/not-there': not a local directory and could not be downloaded"):
        resolve_model("someone/not-there")
