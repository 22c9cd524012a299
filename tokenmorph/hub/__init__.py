"""Pre-trained encoders in and out: loading a backbone to evaluate (a tokenmorph checkpoint or
       run
folder, or any timm model: :mod:`.backbone`) and exporting a student encoder for timm
(:mod:`.export`)."""
