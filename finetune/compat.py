"""The one place where ocrtune bridges API renames across the transformers/peft range it
supports (pyproject.toml's lower bounds up to the newest tested release), so no other module
calls a name that one end of the range deprecates."""

from __future__ import annotations

import warnings
from contextlib import contextmanager


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward. transformers 5.24 renamed `gradient_checkpointing_enable`
    to `activation_checkpointing_enable` (the old name warns); older releases have only the old."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextmanager
def _peft_probe_quiet():
    """peft (0.21 and older) reads `model.is_gradient_checkpointing` while it wraps a model, a
    property transformers 5.24 deprecated. The warning is about peft's line, not ours, and would
    be printed on every train and eval: silenced for that one message while peft wraps."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield


def get_peft_model(model, config, adapter_name: str = "default"):
    from peft import get_peft_model as wrap

    with _peft_probe_quiet():
        return wrap(model, config, adapter_name=adapter_name)


def peft_from_pretrained(model, adapter_dir: str, adapter_name: str):
    from peft import PeftModel

    with _peft_probe_quiet():
        return PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name)
