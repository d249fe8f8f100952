"""Federated training across hospitals with Flower (``pip install crosssite[federated]``).

Images never leave their site: one Flower client per site trains locally with the package's training step, and
a Flower server averages what the clients send. Strategies (`STRATEGIES`):

* ``fedbn`` -- FedAvg of every weight except the batch norms, which stay on their site: the paper's
  site-specific normalisation without pooling images (Li, Jiang, Zhang, Kamp, Dou, "FedBN", ICLR 2021);
* ``fedavg`` -- FedAvg of everything, batch-norm statistics included (McMahan et al., AISTATS 2017);
* ``fedprox`` -- FedAvg plus a proximal term ``mu/2 ||w - w_global||^2`` in every local step (Li et al., 2020).

`run_federated` runs everything on one machine in Flower's simulation engine; `crosssite federated-server` and
`crosssite federated-client` run the same strategy and client code as separate processes over gRPC.
"""

from crosssite.federated.client import SiteClient, build_site_model
from crosssite.federated.common import federated_methods, STRATEGIES, FederatedError, shared_keys
from crosssite.federated.server import RoundLogger, make_strategy, run_server
from crosssite.federated.simulation import run_federated, summarise

__all__ = [
    "federated_methods",
    "STRATEGIES",
    "FederatedError",
    "RoundLogger",
    "SiteClient",
    "build_site_model",
    "make_strategy",
    "run_federated",
    "run_server",
    "shared_keys",
    "summarise",
]
