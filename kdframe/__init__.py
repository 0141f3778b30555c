"""kdframe: plugin-based knowledge distillation for BERT-family models.

What plugin authors may import is listed in ``kdframe.api``; everything else is private.
"""

__version__ = "0.1.0"
