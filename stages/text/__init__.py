"""Text sources, samples and contrastive triplets."""
