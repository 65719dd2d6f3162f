"""Dataset registrations. Importing a module registers its names lazily: nothing is read until
``DatasetCatalog.get(name)``, so ``import iaunet`` works without any dataset on disk."""

from . import (  # noqa: F401
    evican2,
    isbi2014,
    livecell,
    revvity25,
    synthetic,  # noqa: F401
)
