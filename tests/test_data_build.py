"""Dataset builds: rejects are listed with reasons, good samples kept, nothing half-written."""

import json

import pytest
from datasets import load_from_disk
from PIL import Image

from data_prep.build import BuildError, build_dataset
from tests.helpers import line_text, make_folder, render_line, tree, write_manifest


def test_folder_build_lists_orphan_and_keeps_the_rest(tmp_path):
    folder = make_folder(tmp_path / "scans", 20, orphans=(7,))
    # Exact duplicates only: the sample lines ("line 0", "line 8") are one glyph apart in a tiny
    # bitmap font, which near-duplicate grouping (tested in test_bad_inputs) would join.
    res = build_dataset("folder", folder, tmp_path / "out", near_duplicate_threshold=0, progress=False)
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report == res.report
    assert report["counts"] == {"candidates": 20, "accepted": 19, "rejected": 1, "fixed": 0,
                                "train": 15, "validation": 2, "test": 2}
    assert report["rejected"] == [{"item": "page_007.png", "reason": "no transcript: expected page_007.md or page_007.txt"}]
    dd = load_from_disk(str(tmp_path / "out"))
    ids = sorted(list(dd["train"]["id"]) + list(dd["validation"]["id"]) + list(dd["test"]["id"]))
    assert ids == sorted(f"page_{i:03d}" for i in range(20) if i != 7)
    row = dd["test"][0]
    assert row["markdown"] == line_text(int(row["id"][-3:]))
    assert row["image"].mode == "RGB" and row["source"] == "folder"
    assert {"README.md", "build_report.json", "ocrtune_dataset.json", "dataset_dict.json"} <= set(tree(tmp_path / "out"))


def test_same_seed_same_split_and_identical_images_share_a_split(tmp_path):
    folder = make_folder(tmp_path / "scans", 30)
    for k in range(3):  # the same page under other names
        render_line(line_text(4)).save(folder / f"copy_{k}.png")
        (folder / f"copy_{k}.md").write_text(line_text(4))
    a = build_dataset("folder", folder, tmp_path / "a", seed=3, near_duplicate_threshold=0, progress=False)
    b = build_dataset("folder", folder, tmp_path / "b", seed=3, near_duplicate_threshold=0, progress=False)
    splits = lambda p: {s: sorted(load_from_disk(str(p))[s]["id"]) for s in ("train", "validation", "test")}  # noqa: E731
    assert splits(tmp_path / "a") == splits(tmp_path / "b")
    where = {i: s for s, ids in splits(tmp_path / "a").items() for i in ids}
    assert len({where[n] for n in ("page_004", "copy_0", "copy_1", "copy_2")}) == 1
    assert a.report["leakage"] == {"checked": True, "shared_groups": 0, "shared_images": 0, "shared_near_duplicates": 0,
                                   "duplicate_images_merged": 3, "near_duplicate_pairs": 0}
    assert a.report["duplicates"] == [{"kind": "identical pixels", "ids": ["copy_0", "copy_1", "copy_2", "page_004"]}]


def test_manifest_rejects_traversal_absolute_and_bad_lines(tmp_path):
    root = tmp_path / "m"
    (root / "img").mkdir(parents=True)
    for i in range(12):
        render_line(line_text(i)).save(root / "img" / f"{i}.png")
    outside = tmp_path / "secret.png"
    render_line("secret").save(outside)
    rows = [{"image": f"img/{i}.png", "markdown": line_text(i), "group": f"writer{i % 3}"} for i in range(12)]
    rows += [{"image": "../secret.png", "markdown": "x"}, {"image": str(outside), "markdown": "x"},
             {"image": "file:///etc/passwd", "markdown": "x"}, {"markdown": "no image"}]
    manifest = write_manifest(root / "pages.jsonl", rows)
    with manifest.open("a") as fh:
        fh.write("{not json\n")
    res = build_dataset("manifest", manifest, tmp_path / "out", max_rejected=0.5, near_duplicate_threshold=0,
                        progress=False)
    reasons = {r["item"]: r["reason"] for r in res.report["rejected"]}
    assert len(reasons) == 5 and res.report["counts"]["accepted"] == 12
    assert "resolves outside the data root" in reasons["pages.jsonl:13"]
    assert "absolute paths are not accepted" in reasons["pages.jsonl:14"]
    assert "URLs are not accepted" in reasons["pages.jsonl:15"]
    assert "missing field(s) image" in reasons["pages.jsonl:16"]
    assert "invalid JSON" in reasons["pages.jsonl:17"]
    dd = load_from_disk(str(tmp_path / "out"))
    groups = {s: set(dd[s]["group"]) for s in dd}
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["validation"])


def test_bad_files_rejected_with_reasons(tmp_path):
    folder = make_folder(tmp_path / "scans", 30)
    (folder / "empty.png").write_bytes(b"")
    (folder / "empty.md").write_text("x")
    (folder / "notimage.png").write_text("hello")
    (folder / "notimage.md").write_text("x")
    good = folder / "page_000.png"
    (folder / "trunc.png").write_bytes(good.read_bytes()[:200])
    (folder / "trunc.md").write_text("x")
    Image.new("RGB", (10, 10)).save(folder / "cp.png")
    (folder / "cp.md").write_bytes("caf\xe9".encode("cp1252"))
    res = build_dataset("folder", folder, tmp_path / "out", max_rejected=0.2, progress=False)
    reasons = {r["item"]: r["reason"] for r in res.report["rejected"]}
    assert set(reasons) == {"empty.png", "notimage.png", "trunc.png", "cp.png"}
    assert "empty file" in reasons["empty.png"]
    assert "not an image" in reasons["notimage.png"]
    assert "cannot decode" in reasons["trunc.png"]
    assert "cp.md: not valid UTF-8 at line 1" in reasons["cp.png"]
    assert res.report["counts"]["accepted"] == 30


def test_bomb_refused_before_decode(tmp_path):
    folder = make_folder(tmp_path / "scans", 20)
    Image.new("1", (5000, 5000)).save(folder / "bomb.png")  # tiny file, 25 MP
    (folder / "bomb.md").write_text("x")
    res = build_dataset("folder", folder, tmp_path / "out", max_pixels=1_000_000, progress=False)
    assert "exceeds the cap of 1000000" in res.report["rejected"][0]["reason"]


def test_too_many_rejects_fails_and_writes_nothing(tmp_path):
    folder = make_folder(tmp_path / "scans", 10, orphans=(1, 2, 3))
    with pytest.raises(BuildError, match=r"3 of 10 items rejected .* nothing was written"):
        build_dataset("folder", folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["scans"]  # no temp dirs left behind


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    folder = make_folder(tmp_path / "scans", 10)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BuildError, match="already exists; pass --overwrite"):
        build_dataset("folder", folder, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    build_dataset("folder", folder, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "dataset_dict.json").is_file()


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(BuildError, match="--input .*nope: not a directory"):
        build_dataset("folder", tmp_path / "nope", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_fractions_fail_before_any_work(tmp_path):
    folder = make_folder(tmp_path / "scans", 3)
    with pytest.raises(BuildError, match=r"--val-fraction \(0.6\) and --test-fraction \(0.5\)"):
        build_dataset("folder", folder, tmp_path / "out", val_fraction=0.6, test_fraction=0.5, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.integration  # a CLI subprocess or a training run
def test_empty_split_asked_for_is_a_warning_in_output_and_report(tmp_path):
    """2 writers, 15 lines, 10% fractions: whole groups go to one split, so validation and test
    come out empty; the build says so instead of silently putting all 15 lines in train."""
    from tests.helpers import run_cli

    root = tmp_path / "lines"
    (root / "img").mkdir(parents=True)
    for i in range(15):
        render_line(line_text(i)).save(root / "img" / f"{i}.png")
    rows = [{"image": f"img/{i}.png", "markdown": line_text(i), "group": f"writer{i % 2}"} for i in range(15)]
    manifest = write_manifest(root / "pages.jsonl", rows)
    proc = run_cli("data", "build", "--source", "manifest", "--input", str(manifest), "--output", str(tmp_path / "out"),
                   "--val-fraction", "0.1", "--test-fraction", "0.1", "--near-duplicate-threshold", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert {s: report["counts"][s] for s in ("train", "validation", "test")} == {"train": 15, "validation": 0, "test": 0}
    expected = [f"the {s} split is empty though its fraction is 0.1: the 15 accepted items form only 2 group(s) "
                "(declared groups, identical and near-duplicate images), and whole groups go to one split; add items "
                "or groups, or raise the fraction" for s in ("validation", "test")]
    assert report["warnings"] == expected
    assert [x for x in proc.stderr.splitlines() if x.startswith("warning: ")] == [f"warning: {w}" for w in expected]
    assert f"**Warning:** {expected[1]}." in (tmp_path / "out" / "README.md").read_text()


def test_no_warning_when_every_split_asked_for_has_items(tmp_path):
    folder = make_folder(tmp_path / "scans", 20)
    res = build_dataset("folder", folder, tmp_path / "out", val_fraction=0.1, test_fraction=0.2,
                        near_duplicate_threshold=0, progress=False)
    assert res.report["warnings"] == [] and res.report["counts"]["validation"] > 0 and res.report["counts"]["test"] > 0
