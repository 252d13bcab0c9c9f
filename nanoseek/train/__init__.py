"""Pretraining: the loop (pretrain), its objective, AdamW + schedules (optim), FP8 (fp8), data/expert
parallelism (parallelize), atomic checkpoints (checkpoint) and JSONL metrics + plots (metrics)."""
