"""CER definitions, written out with examples."""

import jiwer
import numpy as np
import pytest

from finetune.metrics import corpus_cer, edit_counts, normalize, paired_bootstrap, system_metrics

PAIRS = [
    ("Grüße aus Köln — 12/03/1998", "Grusse aus Koln - 12/03/1998"),
    ("  leading and trailing spaces  ", "leading and trailing spaces"),
    ("ÅNGSTRÖM naïve café", "ANGSTROM naive cafe"),
    ("日本語のテキスト", "日本語テキスト"),
    ("a", "b"),
    ("x" * 500 + " long line " + "y" * 300, "x" * 498 + " long lime " + "y" * 303),
]


def test_cer_raw_equals_jiwer_corpus_cer():
    refs, hyps = [r for r, _ in PAIRS], [h for _, h in PAIRS]
    ours = system_metrics(refs, hyps)["cer_raw"]
    assert ours == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)


@pytest.mark.parametrize(
    "level, text, expected",
    [
        ("L0", "  a\r\nb  ", "a\r\nb"),
        ("L1", "“Quote” – dash\u200b\r\n\n  end", '"Quote" - dash end'),
        ("L1", "e\u0301", "\u00e9"),  # NFC
        ("L2", "# Title\n\n**bold** and _it_ [link](http://x) ![alt](i.png)\n- item\n> quote", "Title bold and it link alt item quote"),
        ("L2", "| a | b |\n| --- | --- |\n| 1 | 2 |", "a b 1 2"),
        ("L3", "Hello, WORLD! ﬁne", "hello world fine"),
    ],
)
def test_normalisation_levels(level, text, expected):
    assert normalize(text, level) == expected


def test_corpus_cer_is_total_edits_over_total_reference_chars():
    edits, lengths = edit_counts(["abcd", "ab"], ["abXd", "b"], "L0")
    assert edits.tolist() == [1, 1] and lengths.tolist() == [4, 2]
    assert corpus_cer(edits, lengths) == pytest.approx(2 / 6)
    m = system_metrics(["abcd", "ab"], ["abXd", "b"])
    assert m["mean_sample_cer"] == pytest.approx((1 / 4 + 1 / 2) / 2)


def test_bootstrap_ci_covers_estimate_and_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    def sample(n):
        refs = ["abcdefghij"] * n
        base = ["abcdefgXYZ" if rng.random() < 0.6 else "abcdefghij" for _ in range(n)]  # ~18% CER
        adapted = ["abcdefghiZ" if rng.random() < 0.3 else "abcdefghij" for _ in range(n)]  # ~3% CER
        return paired_bootstrap(refs, base, adapted, resamples=10_000, seed=1)
    small, large = sample(40), sample(400)
    for r in (small, large):
        lo, hi = r["cer_delta_ci95"]
        assert lo <= r["cer_delta"] <= hi < 0
        assert r["p_delta_ge_0"] < 0.05
    assert (large["cer_delta_ci95"][1] - large["cer_delta_ci95"][0]) < 0.5 * (small["cer_delta_ci95"][1] - small["cer_delta_ci95"][0])
    assert large["cer_delta"] == pytest.approx(-0.15, abs=0.03)
