"""The contrastive loss against a direct pairwise computation, its gradient, its edge cases, and MS-Net's transfer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from crosssite.losses import knowledge_transfer_loss, ms_net_loss, supervised_contrastive_loss


def pairwise_reference(z: torch.Tensor, y: torch.Tensor, tau: float, form: str = "ntxent") -> float:
    """The loss as the paper writes it: a loop over ordered positive pairs, negatives summed explicitly."""
    z = z.double()
    n = len(y)
    terms = []
    for m in range(n):
        for p in range(n):
            if p == m or y[p] != y[m]:
                continue
            cos = lambda a, b: float(z[a] @ z[b] / (z[a].norm() * z[b].norm()))  # noqa: E731
            pos = math.exp(cos(m, p) / tau)
            neg = sum(math.exp(cos(m, k) / tau) for k in range(n) if y[k] != y[m])
            if form == "ntxent":
                terms.append(-math.log(pos / (pos + neg)))
            else:
                terms.append(-math.log(pos / neg) if neg > 0 else 0.0)
    return sum(terms) / len(terms) if terms else 0.0


def random_batch(gen: torch.Generator, num_sites: int, per_site: int, dim: int = 8, num_classes: int = 2):
    z = torch.randn(num_sites * per_site, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, num_classes, (num_sites * per_site,), generator=gen)
    return z, y


@pytest.mark.parametrize("num_sites", [2, 3, 4])
@pytest.mark.parametrize("form", ["ntxent", "eq4"])
def test_matches_pairwise_loop(num_sites: int, form: str) -> None:
    gen = torch.Generator().manual_seed(num_sites)
    for trial in range(5):
        z, y = random_batch(gen, num_sites, per_site=3)
        tau = (0.05, 0.1, 0.5, 1.0, 0.2)[trial]
        got = supervised_contrastive_loss(z, y, tau=tau, form=form)
        assert got.item() == pytest.approx(pairwise_reference(z, y, tau, form), rel=1e-9, abs=1e-12)


def test_batch_without_positive_pair_is_zero_with_graph() -> None:
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])  # every class once: no positive pair
    loss = supervised_contrastive_loss(z, y)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    assert pairwise_reference(z.detach(), y, 0.05) == 0.0


@pytest.mark.parametrize("form", ["ntxent", "eq4"])
def test_single_class_batch_is_zero_not_nan(form: str) -> None:
    """Positives but no negatives: each NT-Xent term is -log(1) = 0; the Eq. 4 term is defined as 0."""
    z = torch.randn(6, 5, requires_grad=True)
    loss = supervised_contrastive_loss(z, torch.zeros(6, dtype=torch.long), form=form)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(z.grad).all() and z.grad.abs().max() == 0


def test_anchor_without_negative_in_mixed_batch_matches_loop() -> None:
    """Class 2 occurs twice and classes 0/1 many times: rows differ in which negatives they have."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    for form in ("ntxent", "eq4"):
        got = supervised_contrastive_loss(z, y, tau=0.3, form=form).item()
        assert got == pytest.approx(pairwise_reference(z, y, 0.3, form), rel=1e-9)


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 2])
    for form in ("ntxent", "eq4"):
        assert torch.autograd.gradcheck(lambda t: supervised_contrastive_loss(t, y, tau=0.5, form=form), (z,))
    # the small paper temperature is steep; check it where finite differences are still accurate
    z_small = (0.1 * torch.randn(6, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    y_small = torch.tensor([0, 0, 1, 1, 0, 1])
    assert torch.autograd.gradcheck(lambda t: supervised_contrastive_loss(t, y_small, tau=0.05), (z_small,))


def test_scale_invariant_and_stable_at_small_tau() -> None:
    z = torch.randn(16, 8)
    y = torch.randint(0, 2, (16,))
    a = supervised_contrastive_loss(z, y, tau=0.05)
    b = supervised_contrastive_loss(1000 * z, y, tau=0.05)
    assert torch.allclose(a, b, rtol=1e-5)
    extreme = supervised_contrastive_loss(z, y, tau=1e-4)
    assert torch.isfinite(extreme)


def test_aligned_classes_give_lower_loss() -> None:
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    separated = torch.tensor([[1.0, 0.0]] * 3 + [[-1.0, 0.0]] * 3) + 0.01 * torch.randn(6, 2)
    mixed = torch.randn(6, 2)
    assert supervised_contrastive_loss(separated, y) < supervised_contrastive_loss(mixed, y)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="form"):
        supervised_contrastive_loss(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), form="x")
    with pytest.raises(ValueError, match="labels"):
        supervised_contrastive_loss(torch.randn(4, 2), torch.zeros(3, dtype=torch.long))


def test_knowledge_transfer_is_scaled_kl_with_detached_teacher() -> None:
    student = torch.randn(5, 2, requires_grad=True)
    teacher = torch.randn(5, 2, requires_grad=True)
    t = 3.0
    got = knowledge_transfer_loss(student, teacher, t)
    p = F.softmax(teacher / t, 1)
    q = F.softmax(student / t, 1)
    expected = (p * (p.log() - q.log())).sum(1).mean() * t * t
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert knowledge_transfer_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)


def test_ms_net_terms() -> None:
    logits, aux = torch.randn(4, 2), torch.randn(4, 2, requires_grad=True)
    y = torch.tensor([0, 1, 1, 0])
    terms = ms_net_loss(logits, aux, y, temperature=2.0)
    assert terms["aux_ce"].item() == pytest.approx(F.cross_entropy(aux, y).item())
    assert terms["kt"].item() == pytest.approx(knowledge_transfer_loss(logits, aux, 2.0).item())
