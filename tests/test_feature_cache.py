"""train.cache_vision_features: each training image's vision features are encoded once, kept on
disk beside the dataset (DATASET.vision_cache/CONTEXT/IMAGE.safetensors) and reused by later
epochs and later runs, for DeepSeek-OCR (v1) and DeepSeek-OCR-2.

The loss at every step equals the uncached run's: bit for bit where a batch is encoded as the
uncached run encodes it, to float rounding where a feature was encoded in another batch. A
changed image, mode, vision setting, weight or numeric setting is another key; a corrupt entry
is detected and recomputed."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import DatasetDict, Image, load_from_disk
from PIL import ImageOps
from PIL import Image as PILImage
from safetensors.torch import load_file

from finetune.config import ConfigError, load_config
from finetune.feature_cache import FeatureCacheError, cache_root, image_hashes, open_cache, unsupported
from finetune.models import load_model
from finetune.sequence import builder_for
from finetune.train import train
from tests.helpers import REPO

TINY_V1 = "builtin:tiny-random-deepseek-ocr"
TINY_OCR2 = "builtin:tiny-random-deepseek-ocr-2"
PROMPT = "<image>\nFree OCR."


@pytest.fixture
def dataset(tiny_dataset, tmp_path):
    """A private copy of the shared dataset: the cache is written beside it."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


# --- training runs -------------------------------------------------------------------------


def _run(model, dataset, out, *extra):
    cfg = load_config(REPO / "configs/runs/tiny_smoke.yaml",
                      [f"model.name={model}", f"data.path={dataset}", f"output_dir={out}", "train.max_steps=8",
                       "train.batch_size=4", "train.grad_accum=2", *extra])
    return train(cfg, progress=False)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _entries(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


@pytest.mark.integration  # training runs
@pytest.mark.parametrize("model", [TINY_V1, TINY_OCR2])
def test_cached_runs_give_the_uncached_loss_at_every_step(dataset, tmp_path, model):
    plain = _run(model, dataset, tmp_path / "plain")
    cold = _run(model, dataset, tmp_path / "cold", "train.cache_vision_features=true")  # fills the cache
    warm = _run(model, dataset, tmp_path / "warm", "train.cache_vision_features=true")  # reads it only
    rows = {name: _rows(tmp_path / name) for name in ("plain", "cold", "warm")}
    ids = [r["sample_ids"] for r in rows["plain"]]
    assert [r["sample_ids"] for r in rows["cold"]] == ids == [r["sample_ids"] for r in rows["warm"]]
    seen = [i for step in ids for i in step]
    n = plain.summary["train_samples"]
    assert len(set(seen)) == n and len(seen) == 2 * n  # two epochs: the second one all from the cache
    # Steps of first-seen pages in the cold run encode them as the uncached run does: equal to
    # the bit. Every other step uses features encoded in another batch (an earlier epoch, or
    # the cold run): equal to float rounding of batched kernels.
    first = set()
    for plain_row, cold_row in zip(rows["plain"], rows["cold"]):
        if not first.intersection(plain_row["sample_ids"]):
            assert cold_row["loss"] == plain_row["loss"], plain_row["step"]
        first.update(plain_row["sample_ids"])
    for name in ("cold", "warm"):
        np.testing.assert_allclose([r["loss"] for r in rows[name]], [r["loss"] for r in rows["plain"]],
                                   rtol=1e-5, atol=0, err_msg=name)

    folder = cache_root(dataset) / Path(cold.summary["vision_feature_cache"]["path"]).name
    files = _entries(folder)
    entries = {k: v for k, v in files.items() if k.endswith(".safetensors")}
    assert set(files) == set(entries) | {"context.json"}  # no temp file left behind
    assert len(entries) == n
    assert cold.summary["vision_feature_cache"] == {
        "path": str(folder), "images": n, "hits": len(seen) - n, "misses": n, "written": n, "corrupt": 0,
        "bytes": sum(entries.values())}
    assert warm.summary["vision_feature_cache"] == {
        "path": str(folder), "images": n, "hits": len(seen), "misses": 0, "written": 0, "corrupt": 0,
        "bytes": sum(entries.values())}
    assert plain.summary["vision_feature_cache"] is None
    written = json.loads((tmp_path / "cold/train_summary.json").read_text())["vision_feature_cache"]
    assert written == cold.summary["vision_feature_cache"]
    a = load_file(tmp_path / "plain/adapter/adapter_model.safetensors")
    for name in ("cold", "warm"):
        b = load_file(tmp_path / name / "adapter/adapter_model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(b[key].numpy(), a[key].numpy(), rtol=1e-4, atol=1e-6, err_msg=f"{name} {key}")


@pytest.mark.parametrize("extra, message", [
    (("lora.train_projector=true",), "train.cache_vision_features: the vision features change while training "
                                     "with lora.train_projector; turn one or the other off"),
    (("lora.vision_lora=true",), "with lora.vision_lora;"),
    (("lora.preset=full",), "with lora.preset full;"),
])
def test_cache_refused_when_the_vision_side_trains(dataset, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _run(TINY_V1, dataset, tmp_path / "run", "train.cache_vision_features=true", *extra)
    assert not (tmp_path / "run").exists()


@pytest.mark.integration  # a training run up to the cache
def test_an_unwritable_cache_location_is_an_input_error(dataset, tmp_path):
    cache_root(dataset).write_text("a file where the cache folder goes")
    with pytest.raises(FeatureCacheError, match=r"^train\.cache_vision_features: cannot write the cache at "):
        _run(TINY_V1, dataset, tmp_path / "run", "train.cache_vision_features=true")


# --- the cache itself, on real batches of the tiny models ------------------------------------


def _model(name):
    resolved, model, processor = load_model(name, dtype=torch.float32)
    model.requires_grad_(False)  # as decoder LoRA leaves the vision side
    return resolved.family, model, processor


def _open(family, model, processor, vision, dataset, messages=None, **setting):
    split = load_from_disk(str(dataset))["train"]
    where = {"device_type": "cpu", "precision": "no"} | setting
    return open_cache(model, family, processor, vision.as_dict(), dataset, split, range(len(split)),
                      autocast=contextlib.nullcontext, sharded=False,
                      say=messages.append if messages is not None else print, **where)


def _batch(family, processor, model, vision, dataset, rows):
    builder = builder_for(family, processor, model.config, PROMPT, vision)
    split = load_from_disk(str(dataset))["train"]
    return builder.collate([builder.build(r["id"], r["image"], r["markdown"]) for r in split.select(rows)])


def _logits(model, inputs):
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k not in ("labels", "ids")}).logits


@pytest.mark.parametrize("name", [TINY_V1, TINY_OCR2])
def test_cached_features_give_the_forward_pass_of_the_pixels(dataset, name):
    family, model, processor = _model(name)
    vision = family.vision_settings(processor, None)
    batch = _batch(family, processor, model, vision, dataset, range(4))
    reference = _logits(model, batch)
    cache = _open(family, model, processor, vision, dataset)
    assert torch.equal(_logits(model, cache.inputs(batch)), reference)  # encoded and stored
    assert torch.equal(_logits(model, cache.inputs(batch)), reference)  # read back from disk
    assert (cache.hits, cache.misses, cache.written) == (4, 4, 4)
    again = _open(family, model, processor, vision, dataset)  # a later run: the same entries
    assert again.folder == cache.folder
    assert torch.equal(_logits(model, again.inputs(batch)), reference)
    assert (again.hits, again.misses, again.written) == (4, 0, 0)


def test_another_mode_setting_or_numeric_setting_is_another_cache(dataset):
    family, model, processor = _model(TINY_V1)
    gundam = family.vision_settings(processor, "gundam")
    cache = _open(family, model, processor, gundam, dataset)
    cache.inputs(_batch(family, processor, model, gundam, dataset, range(4)))
    folders = {cache.folder}
    for vision, setting in [(family.vision_settings(processor, "base"), {}),
                            (family.vision_settings(processor, "gundam", None, None, 4), {}),  # max_tiles
                            (gundam, {"precision": "bf16"}), (gundam, {"device_type": "cuda"})]:
        other = _open(family, model, processor, vision, dataset, **setting)
        assert other.folder.parent == cache.folder.parent and other.folder not in folders
        folders.add(other.folder)
        other.inputs(_batch(family, processor, model, vision, dataset, range(4)))
        assert (other.hits, other.misses, other.written) == (0, 4, 4)
    assert _open(family, model, processor, gundam, dataset).folder == cache.folder  # the same inputs: found


@pytest.mark.parametrize("name", [TINY_V1, TINY_OCR2])
def test_the_key_follows_the_vision_weights_and_not_the_decoder(dataset, name):
    family, model, processor = _model(name)
    vision = family.vision_settings(processor, None)
    prefixes = tuple(family.LAYOUT.vision) + tuple(family.LAYOUT.projector)
    # The fingerprint covers every weight outside the decoder: nothing else feeds the features.
    names = [n for n, _ in [*model.named_parameters(), *model.named_buffers()]]
    outside = [n for n in names if not n.startswith(("model.language_model.", "lm_head."))]
    assert outside and all(any(n == p or n.startswith(p + ".") for p in prefixes) for n in outside)
    folder = _open(family, model, processor, vision, dataset).folder
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] += 1.0
        model.model.language_model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    assert _open(family, model, processor, vision, dataset).folder == folder
    params = dict(model.named_parameters())
    for prefix in prefixes:  # one weight of each part of the vision side
        name_ = next(n for n in params if n == prefix or n.startswith(prefix + "."))
        with torch.no_grad():
            params[name_].view(-1)[0] += 1.0
        changed = _open(family, model, processor, vision, dataset).folder
        assert changed != folder, name_
        folder = changed


def _replace_image(dataset: Path, tmp_path: Path, row: int) -> None:
    """Rebuild DATASET in place with the training image of `row` inverted; every other stored
    image keeps its bytes (the column is handled undecoded)."""
    splits = load_from_disk(str(dataset))
    raw = splits["train"].cast_column("image", Image(decode=False))
    old = PILImage.open(io.BytesIO(raw[row]["image"]["bytes"])).convert("RGB")
    buf = io.BytesIO()
    ImageOps.invert(old).save(buf, format="PNG")
    changed = raw.map(lambda r, i: {"image": {"bytes": buf.getvalue(), "path": None} if i == row else r["image"]},
                      with_indices=True).cast_column("image", Image())
    DatasetDict({**splits, "train": changed}).save_to_disk(str(tmp_path / "rebuilt"))
    shutil.rmtree(dataset)
    shutil.move(str(tmp_path / "rebuilt"), str(dataset))


def test_a_changed_image_is_another_entry(dataset, tmp_path):
    family, model, processor = _model(TINY_V1)
    vision = family.vision_settings(processor, None)
    ids = load_from_disk(str(dataset))["train"]["id"]
    cache = _open(family, model, processor, vision, dataset)
    before = dict(cache.image_keys)
    for rows in (range(4), range(4, 8)):
        cache.inputs(_batch(family, processor, model, vision, dataset, rows))
    _replace_image(dataset, tmp_path, 1)
    after = _open(family, model, processor, vision, dataset)
    assert after.folder == cache.folder  # the same model and settings
    assert [i for i in ids if after.image_keys[i] != before[i]] == [ids[1]]
    batch = _batch(family, processor, model, vision, dataset, range(4))
    reference = _logits(model, batch)
    # The batch holding the changed page is encoded whole, as without a cache; only the new
    # image is written.
    assert torch.equal(_logits(model, after.inputs(batch)), reference)
    assert (after.hits, after.misses, after.written) == (0, 4, 1)
    after.inputs(_batch(family, processor, model, vision, dataset, range(4, 8)))
    assert (after.hits, after.misses, after.written) == (4, 4, 1)
    assert torch.equal(_logits(model, after.inputs(batch)), reference)
    assert (after.hits, after.misses, after.written) == (8, 4, 1)


def test_corrupt_entries_are_detected_and_recomputed(dataset):
    family, model, processor = _model(TINY_OCR2)
    vision = family.vision_settings(processor, None)
    batch = _batch(family, processor, model, vision, dataset, range(4))
    reference = _logits(model, batch)
    cache = _open(family, model, processor, vision, dataset)
    cache.inputs(batch)
    paths = [cache.path(cache.image_keys[i]) for i in batch["ids"]]
    good = [p.read_bytes() for p in paths]
    features = [load_file(p)["features"].clone() for p in paths]  # a copy: load_file maps the file
    paths[0].write_bytes(good[0][: len(good[0]) // 2])  # a truncated write
    paths[1].write_bytes(good[1][:-1] + bytes([good[1][-1] ^ 1]))  # one flipped bit in the tensor
    paths[2].write_bytes(good[3])  # a whole entry, of another image
    messages = []
    again = _open(family, model, processor, vision, dataset, messages)
    assert torch.equal(_logits(model, again.inputs(batch)), reference)
    assert (again.corrupt, again.hits, again.misses, again.written) == (3, 0, 4, 3)
    assert messages == [
        f"train.cache_vision_features: {paths[0]} is corrupt (unreadable: Error while deserializing: incomplete "
        "metadata, file not fully covered); recomputing it",
        f"train.cache_vision_features: {paths[1]} is corrupt (checksum mismatch); recomputing it",
        f"train.cache_vision_features: {paths[2]} is corrupt (written for another key); recomputing it"]
    for path, feature in zip(paths, features):  # rewritten as first written: the same batch, the same bits
        assert torch.equal(load_file(path)["features"], feature)
    assert torch.equal(_logits(model, again.inputs(batch)), reference)
    assert (again.corrupt, again.hits, again.misses, again.written) == (3, 4, 4, 3)


def test_refusals_name_the_key(dataset):
    family, model, processor = _model(TINY_V1)
    vision = family.vision_settings(processor, None)
    split = load_from_disk(str(dataset))["train"]
    common = {"device_type": "cpu", "precision": "no", "autocast": contextlib.nullcontext, "say": print}
    with pytest.raises(FeatureCacheError, match=r"^train\.cache_vision_features: not available with FSDP or "
                                                r"DeepSpeed \(sharded weights\); use DDP or turn the cache off$"):
        open_cache(model, family, processor, vision.as_dict(), dataset, split, [0], sharded=True, **common)
    attn = model.model.sam_model.layers[0].attn
    attn.dropout = 0.1
    with pytest.raises(FeatureCacheError, match=r"^train\.cache_vision_features: the vision side drops out while "
                                                r"training \(model\.sam_model\.layers\.0\.attn\.dropout\), so its "
                                                r"features differ at every step; turn the cache off$"):
        open_cache(model, family, processor, vision.as_dict(), dataset, split, [0], sharded=False, **common)
    attn.dropout = 0.0
    model.model.view_seperator.requires_grad_(True)
    with pytest.raises(FeatureCacheError, match=r"^train\.cache_vision_features: the vision side trains "
                                                r"\(model\.view_seperator, \.\.\.\), so its features change every "
                                                r"step; freeze it or turn the cache off$"):
        open_cache(model, family, processor, vision.as_dict(), dataset, split, [0], sharded=False, **common)
    assert not cache_root(dataset).exists()  # refused before anything was written
    assert unsupported("deepseek_ocr") is None and unsupported("deepseek_ocr2") is None
    assert unsupported("llama") == ("train.cache_vision_features: supported for deepseek_ocr, deepseek_ocr2, "
                                    "not llama")


def test_an_id_naming_two_images_is_refused(dataset):
    split = load_from_disk(str(dataset))["train"]
    ids = split["id"]
    twice = split.map(lambda r, i: {"id": ids[0] if i == 1 else r["id"]}, with_indices=True)
    assert image_hashes(twice, [0, 2]).keys() == {ids[0], ids[2]}
    with pytest.raises(FeatureCacheError, match=rf"^train\.cache_vision_features: the id '{ids[0]}' names two "
                                                r"different images in the training split; ids must be unique"):
        image_hashes(twice, [0, 1])
