import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """(resolved, model, processor) of the shipped tiny random model, loaded once."""
    from finetune.models import load_model

    from tests.helpers import TINY

    return load_model(TINY)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A built dataset of 40 rendered lines (one shared by several tests; treat as read-only)."""
    from data_prep.build import build_dataset

    from tests.helpers import make_folder

    root = tmp_path_factory.mktemp("pages")
    folder = make_folder(root / "scans", 40)
    result = build_dataset("folder", folder, root / "data", val_fraction=0.1, test_fraction=0.2, seed=0, progress=False)
    return result.output
