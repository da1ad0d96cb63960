"""Where this project's inputs and the original LiME code's differ, and the switches between them.

- Images: `use_original_image_settings` gives a LLaVA-OneVision processor and model config the
  original's single-tile setting (`lime train` / `lime eval` apply it unless `--stock-processor`).
- Video frames: `frame_rounding` "round" (default) or "floor" (the original's), for
  `lime.data.frame_indices` (`--frame-sampling`).
- Over-long rows: `truncate` None (an error, the default), "question" or "tail" (the original's cut),
  for `lime.data.MultiModalDataset` (`--truncate`).

`lime train --compat original` (and `lime eval` of an adapter trained so) selects floored frame indices
unless `--frame-sampling` is given; the single-tile images are the default either way.

This module imports nothing heavy: the command line reads its choices before any model loads.
"""

from __future__ import annotations

from typing import Dict, Optional

from lime_kernels.options import positive_integer

# How an evenly spaced, fractional frame position becomes a frame index: "round" to the nearest frame
# (this project's default) or "floor" (the original LiME code's integer linspace).
FRAME_ROUNDINGS = ("round", "floor")
# How an over-long row is cut (`truncate`; None: an error): "question" cuts the end of the question and
# keeps the media placeholders, the end of the prompt and the whole answer; "tail" keeps the first
# max_length tokens, the original LiME code's cut (the answer, or at generation the assistant header, can go).
TRUNCATIONS = ("question", "tail")


def check_frame_rounding(frame_rounding: str) -> str:
    """`frame_rounding`, or a ValueError naming it unless it is one of `FRAME_ROUNDINGS`."""
    if frame_rounding not in FRAME_ROUNDINGS:
        raise ValueError(f"frame_rounding must be one of {FRAME_ROUNDINGS}; got frame_rounding={frame_rounding!r}")
    return frame_rounding


def check_truncation(truncate: Optional[str]) -> Optional[str]:
    """`truncate`, or a ValueError naming it unless it is None or one of `TRUNCATIONS`."""
    if truncate is not None and truncate not in TRUNCATIONS:
        raise ValueError(f"truncate must be None (over-long rows are an error) or one of {TRUNCATIONS}; "
                         f"got truncate={truncate!r}")
    return truncate


def use_original_image_settings(processor, config) -> Dict[str, object]:
    """Give a LLaVA-OneVision processor and model config the original LiME code's image settings.

    The original sets `image_grid_pinpoints=[[384, 384]]` and `size` 384x384 on the processor's image
    processor and the same pinpoints on the model config. An image then becomes one 384x384 tile beside
    its 384x384 overview (two crops): 757 to 1485 placeholder tokens with SigLIP's 27x27 patches (1485
    for a square image), instead of up to nine tiles chosen among the checkpoint's 36 grids (up to 8765
    tokens, more than the usual max_length of 2048). The resolution is the vision tower's own
    (`config.vision_config.image_size`), the original's 384 for every released LLaVA-OneVision
    checkpoint; a tower of another size keeps its size, so the setting never feeds it images of a size
    it was not built for.

    Both objects are changed in place: the processor writes one tile's placeholders and the model reads
    one tile's features, so each needs the other (set on one alone, the placeholder count and the
    feature count disagree). Videos are not affected (the video processor resizes frames on its own).
    Returns the settings written: `{"image_grid_pinpoints": [[s, s]], "image_size": s}`.
    """
    from transformers.image_utils import SizeDict

    model_type = getattr(config, "model_type", None)
    if model_type != "llava_onevision":
        raise ValueError(f"the original LiME code's image settings are for LLaVA-OneVision; got a model of type "
                         f"{model_type!r} (keep its own processor: --stock-processor)")
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or not hasattr(image_processor, "image_grid_pinpoints"):
        raise ValueError(f"the processor {type(processor).__name__} has no image processor with image_grid_pinpoints "
                         f"(got {type(image_processor).__name__}); expected a LLaVA-OneVision processor")
    size = positive_integer("vision_config.image_size", config.vision_config.image_size)
    image_processor.image_grid_pinpoints = [[size, size]]
    image_processor.size = SizeDict(height=size, width=size)  # the form the image processor keeps `size` in
    config.image_grid_pinpoints = [[size, size]]
    return {"image_grid_pinpoints": [[size, size]], "image_size": size}
