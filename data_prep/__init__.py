"""Turn (scan, Markdown) pairs into a validated, split `datasets.DatasetDict`.

One small adapter per input format (`data_prep.sources`) yields candidate records;
`data_prep.build` validates them, splits by group and saves the result with a report
and a dataset card. Nothing here imports from `finetune`.
"""

DEFAULT_PROMPT = "<image>\nFree OCR."
