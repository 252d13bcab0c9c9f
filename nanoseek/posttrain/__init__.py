"""Post-training: SFT, DPO, a reward model, GRPO (R1-Zero / R1), rejection sampling and distillation."""
