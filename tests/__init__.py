from pathlib import Path

# The project's shared reference data lives beside the repository (../shared from its root), never at a fixed path.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GSM8K = SHARED / "data" / "gsm8k" / "train.jsonl"
