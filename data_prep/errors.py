"""The one base class of ocrtune's user errors (bad input, config, file or name).

It lives here, in the lower layer, so that data_prep's errors and finetune's share it
while data_prep imports nothing from finetune; `finetune.errors` re-exports it. The CLI
prints such an error as one line naming the file, field or key, and exits 2.
"""


class OcrtuneError(Exception):
    """A user error; its message names the file, field or key at fault."""


class InputError(OcrtuneError, ValueError):
    """A bad argument or value (also a ValueError, so value checks that catch ValueError
    keep catching it)."""


class MissingPathError(OcrtuneError, FileNotFoundError):
    """An input file or folder that is not there."""


class ExistingPathError(OcrtuneError, FileExistsError):
    """An output that exists and may not be overwritten."""
