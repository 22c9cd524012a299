"""tokenmorph: masked-image-modelling pre-training of Vision Transformers with Dynamic Token
Morphing.

Core pieces (import what you need, each module stands alone):
    tokenmorph.morph    bipartite token morphing (labels + scatter), dynamic schedules
    tokenmorph.losses   the DTM loss and its nn.Module wrapper DTMLoss
    tokenmorph.masking  BEiT block-wise and MAE random masking
"""

__version__ = "0.1.0"
