"""What server and clients agree on: the strategies, the trainable methods, and which weights travel."""

from __future__ import annotations

from torch import nn

from crosssite.errors import CrossSiteError
from crosssite.models import norm_state_keys
from crosssite.training.methods import federated_methods

__all__ = ["STRATEGIES", "federated_methods", "FederatedError", "shared_keys"]

# fedbn: FedAvg of every weight except the batch norms, which stay on their site (Li et al., ICLR 2021);
# fedavg: FedAvg of everything (McMahan et al., 2017); fedprox: fedavg + a proximal term (Li et al., MLSys 2020).
STRATEGIES = ("fedbn", "fedavg", "fedprox")

class FederatedError(CrossSiteError):
    """A federated run that cannot go on: mismatching clients, a round without any result, a missing model."""


def shared_keys(model: nn.Module, strategy: str) -> list[str]:
    """The ``state_dict`` keys a client sends and receives, in state-dict order.

    Every floating-point entry (weights and, except under FedBN, batch-norm running statistics); integer
    counters (``num_batches_tracked``) stay local. Under ``fedbn`` no batch-norm entry ever leaves the client.
    """
    local = set(norm_state_keys(model)) if strategy == "fedbn" else set()
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and k not in local]
