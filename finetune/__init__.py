"""ocrtune: adapt DeepSeek-OCR to your documents with LoRA, and prove the gain.

Importing this package loads no model and touches no network.
"""

__version__ = "0.1.0"
