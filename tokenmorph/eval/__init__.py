"""Evaluation protocols, each a reusable function with its own program in
   :mod:`tokenmorph.commands`
(as DINOv2's ``eval/``): frozen-feature k-NN (:mod:`.knn`) and linear probe (:mod:`.linear`) on
features extracted once (:mod:`.features`); the frozen-feature segmentation probe
(:mod:`.segmentation`, DINOv2's linear protocol); the spatial-consistency analysis of targets
(:mod:`.consistency`); reconstructions of pixel objectives (:mod:`.reconstruct`); and the
side-by-side comparison of pre-training configs (:mod:`.compare`). Fine-tuning is a recipe:
:mod:`tokenmorph.recipes.finetune` (classification), :mod:`tokenmorph.recipes.segment`
(segmentation).
"""

# The frozen-feature protocols, by name: ``tokenmorph eval <name>`` (commands/eval_<name>.py, a
# hyphen written as an underscore) and compare's columns come from here.
PROTOCOLS = {
    "knn": "weighted k-NN classification on frozen features",
    "linear": "linear probe on frozen features",
    "seg-linear": "linear segmentation probe on frozen patch tokens (DINOv2's protocol)",
}
