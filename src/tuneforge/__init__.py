"""tuneforge: fine-tune large language models correctly.

Importing this package is cheap: torch, transformers and peft load only inside the functions that need them.
"""

__version__ = "0.1.0"
