"""hawor-tune: hyperparameter search for HaWoR-style egocentric hand-motion models."""

__version__ = "0.1.0"
