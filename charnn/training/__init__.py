"""The training loop and all it decides and keeps: options, plan, position,
budget and schedule, runtime, validation, fine-tuning."""
