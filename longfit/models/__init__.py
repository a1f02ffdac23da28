"""Model architectures, checkpoint loaders and tokenizers. Keep this file free of imports: the planner
imports the torch-free ``longfit.models.model_config`` without pulling torch in."""
