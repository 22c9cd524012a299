"""Evaluation protocols (DINOv2-style separate programs): k-NN, linear probe. Fine-tuning is tokenmorph.finetune."""
