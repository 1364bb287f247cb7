"""Which errors are the user's (exit 2, one line) and which are ours (exit 1, logged)."""


def test_only_ocrtune_errors_are_user_errors(tmp_path, capsys):
    """Exit 2 and one line for an OcrtuneError (any subclass, from data_prep or finetune);
    a plain ValueError or OSError is ours to fix: exit 1, one line, traceback in the log."""
    from data_prep.errors import ExistingPathError, InputError, MissingPathError
    from finetune.errors import run_command
    from finetune.models import ModelNameError

    def fail(exc):
        def body():
            raise exc
        return body

    for exc in (InputError("--n 0: must be at least 1"), MissingPathError("--input x: no such file or folder"),
                ExistingPathError("--output y already exists"), ModelNameError("unknown model 'z'")):
        assert run_command("stage", fail(exc), lambda: tmp_path) == 2
        assert capsys.readouterr().err == f"error: {exc}\n"
    assert not (tmp_path / "ocrtune-error.log").exists()
    for exc in (ValueError("shapes differ"), FileNotFoundError("weights.bin")):
        assert run_command("stage", fail(exc), lambda: tmp_path) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"internal error in stage: {type(exc).__name__}: ") and str(tmp_path) in err
    assert (tmp_path / "ocrtune-error.log").read_text().count("Traceback (most recent call last)") == 2
