"""Projectors: shapes, teacher normalisation, (semi-)orthogonality under training, and their configs."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from kdrun.config import validate_target_node
from kdrun.projectors._common import _QRStiefel, normalize_teacher, stiefel
from kdrun.projectors.ensemble import Ensemble
from kdrun.projectors.identity import Identity, ProjectorDimError
from kdrun.projectors.linear import Linear
from kdrun.projectors.mlp import MLP
from kdrun.projectors.orthogonal import Orthogonal
from kdrun.projectors.subspace import Subspace
from tests.conftest import compose_cfg

REPO = Path(__file__).resolve().parents[2]
PROJECTOR_YAMLS = sorted((REPO / "conf" / "projector").glob("*.yaml"))


def _orthonormal_columns_error(w: torch.Tensor) -> float:
    """max |WᵀW − I| for a tall W (or |WWᵀ − I| for a wide one)."""
    w = w.detach().double()
    g = w.t() @ w if w.shape[0] >= w.shape[1] else w @ w.t()
    return (g - torch.eye(g.shape[0], dtype=g.dtype)).abs().max().item()


def _train(module: nn.Module, s_dim: int, t_dim: int, steps: int = 100) -> None:
    """100 Adam steps on a random linear regression of the student onto the teacher side."""
    torch.manual_seed(0)
    zs, zt = torch.randn(64, s_dim), torch.randn(64, t_dim)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(steps):
        a, b = module(zs, zt)
        loss = (a - b).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("omap", ["auto", "householder", "cayley", "qr"])
@pytest.mark.parametrize("s_dim,t_dim", [(8, 16), (16, 8), (12, 12)])
def test_orthogonal_stays_semi_orthogonal_after_training(s_dim: int, t_dim: int, omap: str) -> None:
    proj = Orthogonal(student_dim=s_dim, teacher_dim=t_dim, teacher_norm="none", orthogonal_map=omap)
    w0 = proj.weight.detach().clone()
    _train(proj, s_dim, t_dim)
    assert proj.weight.shape == (t_dim, s_dim)
    assert not torch.allclose(proj.weight, w0)  # it did learn
    assert _orthonormal_columns_error(proj.weight) < 1e-5
    assert not any(n.endswith("bias") for n, _ in proj.named_parameters())


@pytest.mark.parametrize("omap", ["auto", "qr"])
def test_subspace_projections_stay_orthonormal_and_d_diagonal(omap: str) -> None:
    proj = Subspace(student_dim=6, teacher_dim=10, n=16, teacher_norm="none", orthogonal_map=omap)
    _train(proj, 6, 10)
    assert proj.P_s.shape == (16, 6) and proj.P_t.shape == (16, 10)
    assert _orthonormal_columns_error(proj.P_s) < 1e-5
    assert _orthonormal_columns_error(proj.P_t) < 1e-5
    # D is stored as its diagonal: a vector, so it cannot acquire off-diagonal terms.
    assert proj.d.shape == (16,)
    assert not torch.allclose(proj.d, torch.ones(16))


@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (5, 5)])
def test_qr_chart_is_orthonormal_smooth_and_identity_on_the_manifold(shape: tuple[int, int]) -> None:
    """The QR chart: orthonormal output for any full-rank A, W ↦ W on the manifold (so the stored
    parameter starts equal to the initial weight), and analytic gradients equal finite differences."""
    chart = _QRStiefel()
    torch.manual_seed(3)
    a = torch.randn(*shape, dtype=torch.float64)
    w = chart(a)
    assert _orthonormal_columns_error(w) < 1e-12
    assert torch.allclose(chart(w), w, atol=1e-12)  # identity on orthonormal inputs (sign fix)
    assert torch.allclose(chart(3.0 * a), w, atol=1e-12)  # scale-invariant: weight decay on A is harmless
    assert torch.autograd.gradcheck(chart, (a.requires_grad_(),))
    lin = stiefel(nn.Linear(shape[1], shape[0], bias=False), "qr")
    assert torch.allclose(lin.parametrizations.weight.original, lin.weight)


def test_bad_orthogonal_map_is_refused() -> None:
    with pytest.raises(ValueError, match="orthogonal_map='svd' is not one of auto, householder"):
        stiefel(nn.Linear(3, 4), "svd")
    node = OmegaConf.create({"_target_": "kdrun.projectors.orthogonal.Orthogonal", "_partial_": True,
                             "orthogonal_map": "svd"})
    with pytest.raises(Exception, match="orthogonal_map"):
        validate_target_node("projector", node)


def test_subspace_formula_and_default_dimension() -> None:
    torch.manual_seed(1)
    proj = Subspace(student_dim=5, teacher_dim=7)
    assert proj.n == 7
    with torch.no_grad():
        proj.d.copy_(torch.linspace(-1.0, 2.0, 7))
    zs, zt = torch.randn(3, 5), torch.randn(3, 7)
    a, b = proj(zs, zt)
    zt_n = torch.nn.functional.layer_norm(zt, (7,))
    # s = (P_t ẑ_t)ᵀ D (P_s z_s), written with the explicit matrices.
    expected = torch.einsum("bi,i,bi->b", zt_n @ proj.P_t.t(), proj.d, zs @ proj.P_s.t())
    assert torch.allclose(proj.similarity(zs, zt), expected, atol=1e-5)
    assert torch.allclose((a * b).sum(-1), expected, atol=1e-5)
    assert torch.allclose(a, proj.d * (zs @ proj.P_s.t()), atol=1e-6)


def test_subspace_metric_can_become_indefinite() -> None:
    torch.manual_seed(2)
    proj = Subspace(student_dim=4, teacher_dim=4, n=4, teacher_norm="none")
    zs = torch.randn(32, 4)
    opt = torch.optim.Adam([proj.d], lr=0.1)
    for _ in range(50):  # minimise the similarity of identical features: D must turn negative
        loss = proj.similarity(zs, zs).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (proj.d < 0).any()


def test_subspace_rejects_small_n() -> None:
    with pytest.raises(ValueError, match="must be >="):
        Subspace(student_dim=8, teacher_dim=4, n=6)


def test_teacher_norms() -> None:
    torch.manual_seed(3)
    z = torch.randn(16, 8) * 3 + 1
    assert torch.equal(normalize_teacher(z, "none"), z)
    ln = normalize_teacher(z, "layernorm")
    assert torch.allclose(ln.mean(-1), torch.zeros(16), atol=1e-5)
    assert torch.allclose(ln.var(-1, unbiased=False), torch.ones(16), atol=1e-3)
    bs = normalize_teacher(z, "batchstd")
    assert torch.allclose(bs.mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(bs.var(0, unbiased=False), torch.ones(8), atol=1e-3)
    # Duplicating the batch does not change the standardised rows.
    assert torch.allclose(normalize_teacher(torch.cat([z, z]), "batchstd")[:16], bs, atol=1e-6)
    with pytest.raises(ValueError):
        Linear(student_dim=2, teacher_dim=2, teacher_norm="bad")  # type: ignore[arg-type]


@pytest.mark.parametrize("factory,out_dim", [
    (lambda: Linear(student_dim=6, teacher_dim=10), 10),
    (lambda: Orthogonal(student_dim=6, teacher_dim=10), 10),
    (lambda: MLP(student_dim=6, teacher_dim=10, hidden_dim=12), 10),
    (lambda: Ensemble(student_dim=6, teacher_dim=10, kind="orthogonal", num=2), 10),
    (lambda: Subspace(student_dim=6, teacher_dim=10, n=12), 12),
])
def test_shapes_on_vectors_and_tokens(factory, out_dim: int) -> None:
    proj = factory()
    a, b = proj(torch.randn(4, 6), torch.randn(4, 10))
    assert a.shape == (4, out_dim) and b.shape == (4, out_dim)
    a, b = proj(torch.randn(4, 3, 6), torch.randn(4, 3, 10))  # token features
    assert a.shape == (4, 3, out_dim) and b.shape == (4, 3, out_dim)


def test_ensemble_is_the_mean_of_its_members() -> None:
    torch.manual_seed(4)
    ens = Ensemble(student_dim=5, teacher_dim=3, kind="linear", num=3, teacher_norm="layernorm")
    zs, zt = torch.randn(2, 5), torch.randn(2, 3)
    a, b = ens(zs, zt)
    expected = torch.stack([m.proj(zs) for m in ens.members]).mean(0)
    assert torch.allclose(a, expected, atol=1e-6)
    assert torch.allclose(b, torch.nn.functional.layer_norm(zt, (3,)), atol=1e-6)


def test_identity_requires_equal_dims() -> None:
    with pytest.raises(ProjectorDimError):
        Identity(student_dim=3, teacher_dim=4)


@pytest.mark.parametrize("path", PROJECTOR_YAMLS, ids=lambda p: p.stem)
def test_projector_yaml_instantiates_with_exact_keys(path: Path) -> None:
    node = compose_cfg([f"projector={path.stem}"]).projector  # a named option: its base + what differs
    assert node.get("_partial_") is True
    validate_target_node(f"projector[{path.stem}]", node)
    factory = instantiate(node)
    target = factory.func
    params = set(inspect.signature(target).parameters) - {"self", "student_dim", "teacher_dim"}
    keys = {str(k) for k in node.keys()} - {"_target_", "_partial_"}
    assert keys == params, f"{path.name}: keys {sorted(keys)} != parameters {sorted(params)}"
    dim = 6
    proj = factory(student_dim=dim, teacher_dim=dim)
    a, b = proj(torch.randn(4, dim), torch.randn(4, dim))
    assert a.shape[0] == b.shape[0] == 4


def test_orthogonal_affine_is_vkd_orthogonal_linear() -> None:
    """roymiles/vkd vidt/main.py lines 29-44: weight * orthogonal(Linear(bias=False))(x) + bias, init 1 / 0."""
    torch.manual_seed(0)
    proj = Orthogonal(student_dim=5, teacher_dim=7, teacher_norm="none", affine=True)
    assert torch.equal(proj.scale, torch.ones(7)) and torch.equal(proj.shift, torch.zeros(7))
    with torch.no_grad():
        proj.scale.uniform_(0.5, 2.0)
        proj.shift.normal_()
    zs, zt = torch.randn(4, 5), torch.randn(4, 7)
    ps, pt = proj(zs, zt)
    torch.testing.assert_close(ps, proj.scale * (zs @ proj.weight.T) + proj.shift)
    assert torch.equal(pt, zt)
    assert {n for n, _ in proj.named_parameters()} == {"scale", "shift", "proj.parametrizations.weight.original"}
    plain = Orthogonal(student_dim=5, teacher_dim=7)
    assert plain.scale is None and len(list(plain.parameters())) == 1  # the default is unchanged


def test_subspace_identity_metric_has_no_d_parameter() -> None:
    torch.manual_seed(0)
    proj = Subspace(student_dim=6, teacher_dim=6, n=8, teacher_norm="none", metric="identity")
    assert "d" not in dict(proj.named_parameters()) and torch.equal(proj.d, torch.ones(8))
    zs, zt = torch.randn(3, 6), torch.randn(3, 6)
    a, b = proj(zs, zt)
    torch.testing.assert_close(a, zs @ proj.P_s.T)
    torch.testing.assert_close(b, zt @ proj.P_t.T)
    assert "d" in dict(Subspace(student_dim=6, teacher_dim=6).named_parameters())
    with pytest.raises(ValueError, match="metric"):
        Subspace(student_dim=6, teacher_dim=6, metric="diag")  # type: ignore[arg-type]
