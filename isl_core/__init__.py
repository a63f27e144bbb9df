"""isl-kit: inference-specific learning for medical image segmentation (Chen et al., Medical Physics 2025).

One module per pipeline stage; data flows one way:
``data -> segment -> register -> refine -> evaluate -> experiment``.
"""

__version__ = "0.1.0"
