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


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    """Two tiers: tests marked `integration` (CLI subprocesses, training and generation runs) and
    everything else, marked `unit` here (`pytest -m unit`: seconds to a couple of minutes)."""
    for item in items:
        if not any(item.get_closest_marker(name) for name in ("integration", "slow")):
            item.add_marker(pytest.mark.unit)
