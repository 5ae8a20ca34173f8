"""A multilayer perceptron."""

from __future__ import annotations

from typing import Callable, Sequence

from distprop.nn.activation import ReLU
from distprop.nn.container import Sequential
from distprop.nn.dropout import Dropout
from distprop.nn.flatten import Flatten
from distprop.nn.linear import Linear
from distprop.nn.module import Module


class MLP(Sequential):
    """Flatten, then [Linear, activation, (Dropout)] per hidden size, then a Linear to the classes.

    A Sequential, so its state_dict keys ("1.weight", ...) are those of the same
    torch.nn.Sequential. `activation` builds one activation module per hidden layer
    (a class such as `nn.ReLU`, or any callable returning a Module).
    """

    def __init__(self, in_features: int, hidden_sizes: Sequence[int], num_classes: int,
                 activation: Callable[[], Module] = ReLU, dropout: float = 0.0):
        layers: list[Module] = [Flatten()]
        width = in_features
        for hidden in hidden_sizes:
            layers += [Linear(width, hidden), activation()]
            if dropout > 0:
                layers.append(Dropout(dropout))
            width = hidden
        layers.append(Linear(width, num_classes))
        super().__init__(*layers)
