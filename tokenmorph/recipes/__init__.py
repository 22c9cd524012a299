"""Recipes: what a run is. The config schema (:mod:`.config`), the pre-training objective of
       every
framework x objective x target (:mod:`.objectives`), pre-training (:mod:`.pretrain`),
fine-tuning (:mod:`.finetune`) and segmentation fine-tuning (:mod:`.segment`)."""
