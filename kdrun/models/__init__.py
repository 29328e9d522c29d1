"""Models: what the teacher and the student are, and how their features are tapped.

Every model kdrun trains or distils from is a plain ``nn.Module`` (a timm model, a CIFAR-zoo network,
the small digits ConvNet) wrapped by :class:`kdrun.models.taps.Tapped`, which returns a
:class:`kdrun.models.taps.ModelOutput` (logits plus the named features a loss asked for) without
editing the model's code.
"""
