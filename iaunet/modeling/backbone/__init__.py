from .swin import D2SwinTransformer  # noqa: F401  (registers the backbone)
