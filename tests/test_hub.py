"""Publishing: exact staged files, retries on 429/5xx, a failed push leaves the adapter intact.

The Hub's servers cannot be reached from here, so `HfApi` is replaced by a recorder;
everything else is the real code path."""

import hashlib
import json
from types import SimpleNamespace

import pytest
from safetensors.torch import save_file
import torch

import huggingface_hub
from finetune.cli import build_parser
from finetune.hub import PushError, stage, upload


def make_adapter(path, base="builtin:tiny-random-deepseek-ocr-2", local=False):
    path.mkdir(parents=True)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 4)}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}))
    (path / "ocrtune_adapter.json").write_text(json.dumps({"base_model": base, "base_model_is_local_path": local,
                                                           "prompt": "<image>\nFree OCR.", "lora": {"r": 8}}))
    return path


class HTTPError(Exception):
    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.response = SimpleNamespace(status_code=status)


class RecordingApi:
    failures: list = []
    commits: list = []
    repos: list = []

    def __init__(self, *a, **k):
        pass

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        RecordingApi.repos.append((repo_id, private))

    def create_commit(self, repo_id, operations, commit_message):
        if RecordingApi.failures:
            raise HTTPError(RecordingApi.failures.pop(0))
        RecordingApi.commits.append({op.path_in_repo: op.path_or_fileobj for op in operations})
        return SimpleNamespace(commit_url=f"https://hub.example/{repo_id}/commit/1")


@pytest.fixture
def api(monkeypatch):
    RecordingApi.failures, RecordingApi.commits, RecordingApi.repos = [], [], []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


def test_retries_5xx_and_429_then_one_commit_with_exact_files(tmp_path, api):
    files = stage(make_adapter(tmp_path / "a"), "me/x")
    api.failures = [503, 429]
    url = upload(files, "me/x", private=False, backoff_s=0)
    assert url.endswith("/commit/1")
    assert len(api.commits) == 1 and set(api.commits[0]) == {"adapter_model.safetensors", "adapter_config.json",
                                                               "ocrtune_adapter.json", "README.md"}
    assert api.repos[-1] == ("me/x", None)  # public unless asked: private is never forced
    upload(files, "me/x", private=True, backoff_s=0)
    assert api.repos[-1] == ("me/x", True)


def test_persistent_failure_says_not_pushed_and_keeps_adapter(tmp_path, api):
    adapter = make_adapter(tmp_path / "a")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in adapter.iterdir()}
    api.failures = [500] * 10
    with pytest.raises(PushError, match="not pushed"):
        upload(stage(adapter, "me/x"), "me/x", private=False, attempts=3, backoff_s=0)
    assert api.failures == [500] * 7  # three tries, then stop
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in adapter.iterdir()} == before


def test_auth_errors_are_not_retried(tmp_path, api):
    api.failures = [401, 401]
    with pytest.raises(PushError, match="HTTP 401"):
        upload(stage(make_adapter(tmp_path / "a"), "me/x"), "me/x", private=False, backoff_s=0)
    assert api.failures == [401]


def test_local_base_path_needs_a_hub_id(tmp_path):
    adapter = make_adapter(tmp_path / "a", base=str(tmp_path / "my-base"), local=True)
    with pytest.raises(PushError, match="base model is a local path"):
        stage(adapter, "me/x")
    files = stage(adapter, "me/x", base_model_id="deepseek-community/DeepSeek-OCR-2")
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "deepseek-community/DeepSeek-OCR-2"
    assert "base_model: deepseek-community/DeepSeek-OCR-2" in files["README.md"].decode()
    assert "No evaluation report was found" in files["README.md"].decode()


def test_token_is_never_a_command_line_option():
    parser = build_parser()
    push = parser._subparsers._group_actions[0].choices["push"]
    assert not [a for a in push._actions if any("token" in s for s in a.option_strings)]


def test_bad_report_path_and_base_id_are_named(tmp_path):
    adapter = make_adapter(tmp_path / "a")
    with pytest.raises(PushError, match=r"--report .*nope\.json: no such file"):
        stage(adapter, "me/x", report_path=tmp_path / "nope.json")
    with pytest.raises(PushError, match="--base-model-id 'not an id': expected OWNER/NAME"):
        stage(adapter, "me/x", base_model_id="not an id")


@pytest.mark.integration  # a CLI subprocess or a training run
def test_push_cli_bad_report_exits_2_and_writes_nothing(tmp_path):
    from tests.helpers import run_cli

    adapter = make_adapter(tmp_path / "a")
    p = run_cli("push", str(adapter), "--repo-id", "me/x", "--report", str(tmp_path / "nope.json"),
                "--dry-run", str(tmp_path / "preview"))
    assert p.returncode == 2 and "--report" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "preview").exists()


def _report(data="/home/me/private/receipts-ds"):
    return {"data": data, "split": "test", "prompt": "<image>\nFree OCR.", "decoding": {"max_new_tokens": 64},
            "systems": {"base": {"cer": 0.5, "cer_raw": 0.55, "mean_sample_cer": 0.6, "n": 40},
                        "adapted": {"cer": 0.25, "cer_raw": 0.3, "mean_sample_cer": 0.31, "n": 40}},
            "comparison": {"cer_delta": -0.25, "cer_delta_ci95": [-0.3, -0.2], "resamples": 1000, "unit": "groups",
                           "units": 7, "p_delta_ge_0": 0.0}}


def test_card_has_model_index_family_usage_bootstrap_unit_and_no_local_path(tmp_path):
    import yaml

    from finetune.hub import model_card

    card = model_card("me/receipts", "deepseek-ai/DeepSeek-OCR", {"family": "deepseek_ocr", "prompt": "p"}, _report(), [])
    front = yaml.safe_load(card.split("---")[1])
    results = front["model-index"][0]["results"]
    assert [(r["dataset"]["name"], r["dataset"]["split"], r["metrics"][0]["type"], r["metrics"][0]["value"])
            for r in results] == [("receipts-ds", "test", "cer", 50.0), ("receipts-ds", "test", "cer", 25.0)]
    assert "/home/me" not in card and "`receipts-ds`" in card
    assert "paired bootstrap over 7 groups (1000 resamples)" in card
    # v1 has no transformers class: the card must not tell users to load it as OCR-2
    assert "DeepseekOcr2ForConditionalGeneration" not in card and "vllm serve deepseek-ai/DeepSeek-OCR" in card
    assert "vLLM-ready" in card
    refused = model_card("me/r", "deepseek-ai/DeepSeek-OCR", {"family": "deepseek_ocr"}, None, ["modules_to_save x"])
    assert "Not loadable as a vLLM LoRA adapter: modules_to_save x" in refused and "--merge" in refused
    ocr2 = model_card("me/r", "deepseek-community/DeepSeek-OCR-2", {"family": "deepseek_ocr2"}, None, None)
    assert "DeepseekOcr2ForConditionalGeneration.from_pretrained" in ocr2
    # Not checked for vLLM (no problems list): served merged, in the published layout
    assert "--merge --output merged" in ocr2 and "--enable-lora" not in ocr2 and "vLLM-ready" not in ocr2
    # vLLM-ready: a LoRA on the published repository, which vLLM reads (not transformers' copy)
    ready = model_card("me/r", "deepseek-community/DeepSeek-OCR-2", {"family": "deepseek_ocr2"}, None, [])
    assert "vllm serve deepseek-ai/DeepSeek-OCR-2 --enable-lora --lora-modules adapted=vllm-adapter" in ready
    assert "--merge" not in ready and "vLLM-ready" in ready and "DeepseekOcr2ForConditionalGeneration" in ready
    experts = model_card("me/r", "deepseek-community/DeepSeek-OCR-2", {"family": "deepseek_ocr2"}, None, None,
                         per_expert=True)
    assert "PeftModel" not in experts and "ocrtune predict --model deepseek-community/DeepSeek-OCR-2" in experts
    assert "vllm serve merged" in experts


@pytest.mark.parametrize("base, family", [("builtin:tiny-random-deepseek-ocr", "deepseek_ocr"),
                                          ("builtin:tiny-random-deepseek-ocr-2", "deepseek_ocr2")])
def test_push_checks_the_adapter_for_vllm(tmp_path, base, family):
    folder = make_adapter(tmp_path / "a", base=base)
    meta = json.loads((folder / "ocrtune_adapter.json").read_text())
    (folder / "ocrtune_adapter.json").write_text(json.dumps(dict(meta, family=family)))
    assert "vLLM-ready" in stage(folder, "me/x")["README.md"].decode()
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(cfg, modules_to_save=["model.projector.layers"])))
    assert "Not loadable as a vLLM LoRA adapter: modules_to_save" in stage(folder, "me/x")["README.md"].decode()
