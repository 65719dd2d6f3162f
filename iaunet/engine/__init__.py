from .trainer import Trainer, adapt_config_to_machine, setup

__all__ = ["Trainer", "adapt_config_to_machine", "setup"]
