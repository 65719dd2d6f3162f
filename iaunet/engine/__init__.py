from .trainer import (
    Trainer,
    adapt_config_to_machine,
    check_config,
    check_pretrained_weights,
    resolve_config_from_data,
    setup,
)

__all__ = [
    "Trainer",
    "adapt_config_to_machine",
    "check_config",
    "check_pretrained_weights",
    "resolve_config_from_data",
    "setup",
]
