"""`apply_peft` with peft='slicefine' by default. SliceFine: the first `rank` rows of each weight train (LiMESliceFine).

For people coming from the original code (`from LiMELoRA import apply_peft` and its siblings);
it is `lime.apply_peft` with another default.
"""

from .injection import apply_peft as _apply_peft


def apply_peft(model, targets=None, *, peft: str = "slicefine", **kwargs):
    """`lime.apply_peft(model, targets, peft="slicefine", ...)`; every keyword is `lime.apply_peft`'s."""
    return _apply_peft(model, targets, peft=peft, **kwargs)
