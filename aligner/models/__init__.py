"""Models: loading them and wrapping them in DeepSpeed engines, the plan of which models a run holds, the Hub, LoRA."""
