"""Making heads: from labelled images (train_head) or from text prompts (zero_shot)."""
