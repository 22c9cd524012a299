"""Tensor functions: no configs, no files. Shapes are in every docstring.

* :mod:`.morph`: token morphing (bipartite matching on labels and a Gram matrix) and dynamic
  schedules.
* :mod:`.losses`: the DTM loss, its distances, MAE's and the best practice's pixel losses.
* :mod:`.masking`: BEiT block-wise masking, MAE random masking.
* :mod:`.degrade`: the Beyond Masking degradations, one :class:`~.degrade.Degradation` per
  objective.
* :mod:`.patches`: patchify / unpatchify, resizing, per-patch pixel normalisation.
* :mod:`.segmentation`: the segmentation loss, confusion-matrix metrics (mmseg's rules),
  sliding-window and whole-image inference.
"""
