"""ViDT (Song et al., ICLR 2022) in pure PyTorch: Swin with RAM, deformable decoder neck, heads."""
from kdrun.models.vidt.detector import ImageBatch, ViDT, postprocess, vidt_base, vidt_nano, vidt_small, vidt_tiny

__all__ = ["ImageBatch", "ViDT", "postprocess", "vidt_base", "vidt_nano", "vidt_small", "vidt_tiny"]
