from .trainer import (
    Trainer,
    adapt_config_to_machine,
    check_config,
    check_pretrained_weights,
    setup,
)

__all__ = [
    "Trainer",
    "adapt_config_to_machine",
    "check_config",
    "check_pretrained_weights",
    "setup",
]
