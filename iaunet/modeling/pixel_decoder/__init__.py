from .unet_decoder import UNetPixelDecoder

__all__ = ["UNetPixelDecoder"]
