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


def test_wer_page_ned_and_loops_written_out():
    from finetune.metrics import page_ned, repetition_loop, wer

    assert wer(["the **quick** fox", "a b"], ["the quick box", "a b c"]) == pytest.approx(2 / 5)  # L2: ** dropped
    assert page_ned(["abcd", "", "xy"], ["ab", "", "xy"]) == pytest.approx((2 / 4 + 0 + 0) / 3)
    assert page_ned(["a"], ["a" * 50]) == pytest.approx(49 / 50)  # bounded by 1, unlike CER (49)
    assert repetition_loop("Total: 12 " + "the same line\n" * 10)
    assert repetition_loop("x" + "ab" * 40)
    assert not repetition_loop("short aaaaaaaa")  # under 32 characters
    assert not repetition_loop("Chapter 1 " + "." * 60, reference="Chapter 1 " + "." * 60)  # the page has it
    m = system_metrics(["a", "b"], ["a" + "zz" * 30, "b"])
    assert m["repetition_loops"] == 1 and m["share_cer_above_1"] == 0.5


def test_field_scores_and_confusions():
    from finetune.metrics import field_scores, form_fields, top_confusions

    ref = "**Date:** 12/03/1998\n**Total:** 1,234.56\n- **Name** Ada Lovelace\nplain line"
    assert form_fields(ref) == {("Date", "12/03/1998"): 1, ("Total", "1,234.56"): 1, ("Name", "Ada Lovelace"): 1}
    hyp = "**Date** 12/03/1998\n**Total:** 1,234.58\n**Name:** Ada Lovelace\n**Extra:** x"
    assert field_scores([ref], [hyp]) == {"precision": 0.5, "recall": 2 / 3, "f1": pytest.approx(4 / 7),
                                          "reference_fields": 3, "predicted_fields": 4}
    assert field_scores(["no fields here"], ["**a** b"]) is None
    conf = top_confusions(["0O0O", "abc"], ["OOOO", "ab"])
    assert conf[0] == {"reference": "0", "prediction": "O", "count": 2}
    assert {"reference": "c", "prediction": "", "count": 1} in conf


def test_group_bootstrap_resamples_whole_groups():
    rng = np.random.default_rng(1)
    refs = ["abcdefghij"] * 60
    base = ["abcdefgxyz"] * 60
    # adapted is better on every page of half the writers, worse on the others: pages within a
    # writer are correlated, so the group CI must be wider than the page CI.
    adapted = [("abcdefghij" if (i // 10) % 2 == 0 else "axxxxxxxxx") for i in range(60)]
    groups = [f"w{i // 10}" for i in range(60)]
    pages = paired_bootstrap(refs, base, adapted, resamples=4000, seed=int(rng.integers(100)))
    grouped = paired_bootstrap(refs, base, adapted, resamples=4000, seed=0, groups=groups)
    assert pages["unit"] == "pages" and grouped["unit"] == "groups" and grouped["units"] == 6
    assert grouped["cer_delta"] == pytest.approx(pages["cer_delta"])
    width = lambda r: r["cer_delta_ci95"][1] - r["cer_delta_ci95"][0]  # noqa: E731
    assert width(grouped) > 2 * width(pages)
    assert grouped["cer_delta_ci95"][0] <= grouped["cer_delta"] <= grouped["cer_delta_ci95"][1]
