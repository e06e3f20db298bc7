"""Models: loading them and wrapping them in DeepSpeed engines, their attention function, the plan of which models a
run holds, the Hub, LoRA."""


class ModelError(ValueError):
    """A model or tokenizer path is wrong; the message names the config key and the fix."""
