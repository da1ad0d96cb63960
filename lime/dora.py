"""`apply_peft` with peft='dora' by default. DoRA: a trainable magnitude rescales the frozen product and the adapter (LiMEDoRA).

For people coming from the original code (`from LiMELoRA import apply_peft` and its siblings);
it is `lime.apply_peft` with another default.
"""

from .injection import apply_peft as _apply_peft


def apply_peft(model, targets=None, *, peft: str = "dora", **kwargs):
    """`lime.apply_peft(model, targets, peft="dora", ...)`; every keyword is `lime.apply_peft`'s."""
    return _apply_peft(model, targets, peft=peft, **kwargs)
