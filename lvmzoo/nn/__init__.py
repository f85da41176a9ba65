"""Neural-network building blocks (Flax Linen) shared by the zoo's neural models."""

from lvmzoo.nn.mlp import MIN_SCALE, MLP, Dense, GaussianEncoder

__all__ = ["MIN_SCALE", "MLP", "Dense", "GaussianEncoder"]
