"""Fine-tuning: LoRA/QLoRA setup (lora.py), the loss (loss.py), the loop (trainer.py)."""
