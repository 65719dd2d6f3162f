from .query_decoder import QueryDecoder

__all__ = ["QueryDecoder"]
