"""One home per task: its data, networks, metrics and distillation terms (classification, detection)."""
