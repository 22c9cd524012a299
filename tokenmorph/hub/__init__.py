"""Pre-trained encoders in and out: loading a backbone to evaluate (a tokenmorph checkpoint or
run folder, or any timm model: :mod:`.backbone`), exporting a student encoder for timm
(:mod:`.export`), and official MAE checkpoints into the MAE student (:mod:`.mae_checkpoint`)."""
