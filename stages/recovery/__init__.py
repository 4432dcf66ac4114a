"""Recovery methods (LoRA, compensation, both), their losses and merge."""
