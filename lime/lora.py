"""`apply_peft` with peft='lora' by default. LoRA: the original LiMELoRA (the default of `lime.apply_peft`).

For people coming from the original code (`from LiMELoRA import apply_peft` and its siblings);
it is `lime.apply_peft` with another default.
"""

from .injection import apply_peft as _apply_peft


def apply_peft(model, targets=None, *, peft: str = "lora", **kwargs):
    """`lime.apply_peft(model, targets, peft="lora", ...)`; every keyword is `lime.apply_peft`'s."""
    return _apply_peft(model, targets, peft=peft, **kwargs)
