"""The fault suite runs debug-size models on one thread, with the inference tests' tokenizer."""

from tests.infer.conftest import one_thread, tokenizer  # noqa: F401 - fixtures shared with tests/infer
