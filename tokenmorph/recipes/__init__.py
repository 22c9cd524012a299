"""Recipes: what a run is. The config schema (:mod:`.config`), the pre-training objective of
       every
framework x objective x target (:mod:`.objectives`), pre-training (:mod:`.pretrain`) and
fine-tuning (:mod:`.finetune`)."""
