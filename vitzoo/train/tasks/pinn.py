"""The PINN task: MLPs solving the 1-D convection equation, trained by the engine's one loop.

The problem (Krishnapriyan et al., NeurIPS 2021, the periodic convection benchmark)::

    u_t + β u_x = 0,   x ∈ [0, 2π), t ∈ [0, 1],   u(x, 0) = sin x,   u(0, t) = u(2π, t)

whose exact solution is ``u(x, t) = sin(x − βt)``. ``β`` (``objective.beta``) is the zoo's load axis: a plain
PINN fits β = 1 and fails as β grows (errors near 1 from β ≈ 30 in that paper).

Parts (assembled by :func:`build` into a :class:`~vitzoo.train.engine.ModuleRun`):

- points (:class:`ConvectionPoints`): collocation points uniform in the domain, initial-condition points
  at ``t = 0`` and boundary times, each set drawn by a CPU ``torch.Generator`` seeded with
  :func:`~vitzoo.train.seeds.mix` of the run's data seed and the set's tag: a pure function of the seeds,
  the same on every device; no data is read, so a PINN zoo builds fully offline;
- feed (:func:`collocation_feed`, a TensorFeed): an *epoch* is one pass over the collocation points in the order
  :func:`~vitzoo.train.seeds.epoch_order` gives, in batches of ``batch_size``; every step also sees all the
  initial and boundary points (a few hundred). Why so: the engine's epoch is its unit of evaluation,
  history and checkpoints, and a PINN's steps are cheap (a few thousand points), so an epoch of one
  full-batch step would make the per-epoch evaluation on the 25 600-point grid the dominant cost; a pass
  over the collocation set in mini-batches is what an epoch means for every other task, and its number of
  steps is ``ceil(collocation_points / batch_size)`` (the recipe sizes it);
- objective (:class:`PinnLoss`): ``residual_weight · mean(r²) + mean((u(x,0) − sin x)²) +
  mean((u(0,t) − u(2π,t))²)`` with ``r = u_t + β u_x`` by autograd (``create_graph``: the loss is
  differentiated again by the optimizer step);
- evaluator (:func:`evaluate`): ``train_loss`` (that loss on every training point) and its parts
  ``residual_loss``, ``ic_loss``, ``bc_loss``; on the fixed evaluation grid (``objective.eval_grid``,
  256 × 100 as Krishnapriyan et al.'s) ``test_rel_l2 = ‖u − u*‖₂ / ‖u*‖₂`` against the exact solution and
  ``test_loss`` (the same loss with the grid's interior as collocation points, its first row as the
  initial condition and its times as boundary times); ``*_acc`` are None (no classes).

Precision: PINN runs compute in float32 whatever ``precision`` says (second derivatives in bf16 lose the
residual); an explicit bf16/fp16 is refused by :func:`preflight`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from vitzoo.data.sources import DataError
from vitzoo.models import mlp
from vitzoo.plan import RunSpec
from vitzoo.recipe import StageConfig
from vitzoo.train.build import make_optimizer
from vitzoo.train.context import Built, RunContext, cpu_state
from vitzoo.train.feed import TensorFeed
from vitzoo.train.seeds import mix

#: The spatial period (the x domain is ``[0, L)``) and the time horizon.
LENGTH, HORIZON = 2 * math.pi, 1.0
#: Tags of the three point sets in :func:`~vitzoo.train.seeds.mix` (``"PINN"`` in ASCII, then the set).
_TAG = 0x50494E4E
DATASET = "convection"


def exact(x: Tensor, t: Tensor, beta: float) -> Tensor:
    """The exact solution ``sin(x − βt)``."""
    return torch.sin(x - beta * t)


def residual(net: nn.Module, xt: Tensor, beta: float, create_graph: bool = True) -> Tensor:
    """``u_t + β u_x`` of ``net`` at the ``(N, 2)`` points ``xt`` (one autograd call gives both derivatives:
    the gradient of ``sum(u)`` with respect to the inputs, row by row, since point i only affects ``u_i``)."""
    with torch.enable_grad():
        xt = xt.detach().requires_grad_(True)
        u = net(xt)
        (g,) = torch.autograd.grad(u.sum(), xt, create_graph=create_graph)
    return g[:, 1] + beta * g[:, 0]


def function_residual(u_fn: Any, xt: Tensor, beta: float) -> Tensor:
    """:func:`residual` of any function of ``(x, t)`` (tests: the exact solution has residual 0)."""
    return residual(_Fn(u_fn), xt, beta, create_graph=False)


class _Fn(nn.Module):
    def __init__(self, fn: Any):
        super().__init__()
        self.fn = fn

    def forward(self, xt: Tensor) -> Tensor:
        return self.fn(xt[:, 0], xt[:, 1]).unsqueeze(1)


class ConvectionPoints:
    """A run's training points, drawn from its data seed (float32, CPU generators, then moved to ``device``).

    ``collocation``: ``(n, 2)`` uniform in ``[0, 2π) × [0, 1]``; ``initial``: ``(n_i, 2)`` with ``t = 0`` and
    ``initial_u = sin x``; ``boundary_t``: ``(n_b,)`` times in ``[0, 1]``.
    """

    def __init__(self, cfg: StageConfig, data_seed: int, device: torch.device | str = "cpu"):
        o = cfg.objective

        def gen(k: int) -> torch.Generator:
            return torch.Generator(device="cpu").manual_seed(mix(data_seed, _TAG, k))

        g = gen(0)
        self.collocation = torch.stack([torch.rand(o.collocation_points, generator=g) * LENGTH,
                                        torch.rand(o.collocation_points, generator=g) * HORIZON], 1).to(device)
        x0 = torch.rand(o.initial_points, generator=gen(1)) * LENGTH
        self.initial = torch.stack([x0, torch.zeros_like(x0)], 1).to(device)
        self.initial_u = torch.sin(x0).to(device)
        self.boundary_t = (torch.rand(o.boundary_points, generator=gen(2)) * HORIZON).to(device)


def pinn_loss(net: nn.Module, collocation: Tensor, initial: Tensor, initial_u: Tensor, boundary_t: Tensor,
              beta: float, residual_weight: float, create_graph: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """The PINN loss and its parts (``residual``, ``ic``, ``bc``: mean squared errors)."""
    r = residual(net, collocation, beta, create_graph=create_graph)
    ic = net(initial).squeeze(1) - initial_u
    lo = torch.stack([torch.zeros_like(boundary_t), boundary_t], 1)
    hi = torch.stack([torch.full_like(boundary_t, LENGTH), boundary_t], 1)
    bc = (net(lo) - net(hi)).squeeze(1)
    parts = {"residual": r.square().mean(), "ic": ic.square().mean(), "bc": bc.square().mean()}
    return residual_weight * parts["residual"] + parts["ic"] + parts["bc"], parts


def collocation_feed(points: ConvectionPoints, data_seed: int, batch_size: int) -> TensorFeed:
    """One epoch: the collocation points in :func:`~vitzoo.train.seeds.epoch_order`, ``batch_size`` at a
    time (the one last-batch rule): the engine's :class:`~vitzoo.train.feed.TensorFeed` over them (the
    second tensor is a placeholder; the initial and boundary points of every step are the objective's)."""
    c = points.collocation
    return TensorFeed(c, torch.zeros(len(c), device=c.device), data_seed, batch_size)


class PinnLoss:
    """The objective the engine steps: :func:`pinn_loss` of a batch of collocation points with every initial
    and boundary point; ``n`` = its collocation points."""

    equal_batches = False

    def __init__(self, beta: float, residual_weight: float, points: ConvectionPoints):
        self.beta, self.residual_weight, self.points = beta, residual_weight, points

    def start_epoch(self, epoch: int) -> None:
        pass

    def loss(self, net: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        collocation, p = batch[0], self.points
        loss, _ = pinn_loss(net, collocation, p.initial, p.initial_u, p.boundary_t, self.beta, self.residual_weight)
        return loss, collocation.shape[0]

    def columns(self, state: dict[str, Tensor] | None, steps: int) -> dict[str, Any]:
        return {}


class EvalGrid:
    """The fixed evaluation grid (``objective.eval_grid`` = ``[nx, nt]``), as Krishnapriyan et al.'s:
    x = ``linspace(0, 2π, nx, endpoint=False)``, t = ``linspace(0, 1, nt)``; rows are times."""

    def __init__(self, nx: int, nt: int, beta: float, device: torch.device | str = "cpu"):
        x = torch.arange(nx, dtype=torch.float64) * (LENGTH / nx)
        t = torch.linspace(0.0, HORIZON, nt, dtype=torch.float64)
        tt, xx = torch.meshgrid(t, x, indexing="ij")
        self.nx, self.nt = nx, nt
        self.points = torch.stack([xx.reshape(-1), tt.reshape(-1)], 1).float().to(device)
        self.u = exact(xx, tt, beta).reshape(-1).to(device)  # float64: the reference
        self.x0 = torch.stack([x, torch.zeros_like(x)], 1).float().to(device)
        self.u0 = torch.sin(x).float().to(device)
        self.t = t.float().to(device)
        self.interior = self.points.reshape(nt, nx, 2)[1:].reshape(-1, 2)  # t > 0 (every x: periodic domain)


def evaluate(net: nn.Module, points: ConvectionPoints, grid: EvalGrid, beta: float,
             residual_weight: float) -> dict[str, Any]:
    """The history row's metrics (see the module docstring); non-finite values stay (the engine's
    divergence rule reads the ``*loss`` keys)."""
    net.eval()
    loss, parts = pinn_loss(net, points.collocation, points.initial, points.initial_u, points.boundary_t, beta,
                            residual_weight, create_graph=False)
    test_loss = (pinn_loss(net, grid.interior, grid.x0, grid.u0, grid.t, beta, residual_weight, create_graph=False)[0]
                 if len(grid.interior) else loss.new_tensor(float("nan")))
    with torch.no_grad():
        u = net(grid.points).squeeze(1).double()
        rel = torch.linalg.vector_norm(u - grid.u) / torch.linalg.vector_norm(grid.u)
    return {"train_loss": loss.item(), "train_acc": None, "val_loss": None, "val_acc": None,
            "test_loss": test_loss.item(), "test_acc": None, "test_rel_l2": rel.item(),
            "residual_loss": parts["residual"].item(), "ic_loss": parts["ic"].item(), "bc_loss": parts["bc"].item()}


def problem(cfg: StageConfig) -> dict[str, Any]:
    """The PDE a model of ``cfg`` approximates, as config.json records it (``problem``)."""
    o = cfg.objective
    return {"name": "convection_1d", "equation": "u_t + beta * u_x = 0", "beta": o.beta,
            "initial_condition": "u(x, 0) = sin(x)", "boundary_condition": "periodic: u(0, t) = u(2*pi, t)",
            "exact_solution": "u(x, t) = sin(x - beta * t)",
            "domain": {"x": [0.0, LENGTH], "t": [0.0, HORIZON]},
            "eval_grid": {"nx": o.eval_grid[0], "nt": o.eval_grid[1],
                          "x": "linspace(0, 2*pi, nx, endpoint=False)", "t": "linspace(0, 1, nt)"}}


def build(spec: RunSpec, ctx: RunContext) -> Any:
    """The run's parts: the MLP (initialised from the init seed), Adam & co. from the recipe, the points of
    its data seed, the collocation feed, the loss and the evaluator."""
    from vitzoo.train.engine import ModuleRun

    cfg = spec.config
    assert cfg.model is not None
    m = cfg.model
    args = mlp.model_args(m.width, m.depth, m.activation, m.init)
    net = mlp.build(args, spec.init_seed).to(ctx.device)
    beta, w = cfg.objective.beta, cfg.objective.residual_weight
    points = ConvectionPoints(cfg, spec.data_seed, ctx.device)
    grid = EvalGrid(*cfg.objective.eval_grid, beta, ctx.device)
    prob = problem(cfg)
    built = Built(net, lambda: cpu_state(net), mlp.TASK_NAMES["mlp"], args, 0, args["width"], None, None,
                  "none", None, config_json=lambda meta: mlp.config_json(args, prob, meta))

    def run_evaluate() -> dict[str, Any]:
        return evaluate(net, points, grid, beta, w)

    return ModuleRun(spec, built, make_optimizer(net, cfg), PinnLoss(beta, w, points),
                     collocation_feed(points, spec.data_seed, cfg.batch_size), run_evaluate,
                     lambda: (run_evaluate(), built.export()), DATASET, amp=None)


def preflight(cfg: StageConfig, cache: Any) -> None:
    """Nothing to download; refuse what cannot train (the recipe checked types and ranges already):
    a precision other than float32, gradient accumulation (every step sees all initial/boundary points,
    a micro-batch split would cut them), a model the MLP builder refuses."""
    if cfg.precision in ("bf16", "fp16"):
        raise DataError(f"precision: PINN runs compute in float32 (second derivatives in {cfg.precision} lose the "
                        "residual); use auto or no")
    if cfg.micro_batch_size is not None and cfg.micro_batch_size < cfg.batch_size:
        raise DataError("micro_batch_size: a PINN step sees every initial and boundary point; gradient "
                        "accumulation is not supported, remove micro_batch_size")
    assert cfg.model is not None
    m = cfg.model
    try:
        args = mlp.model_args(m.width, m.depth, m.activation, m.init)
        mlp.build(args, seed=0)
    except ValueError as e:
        key = "model.init" if "init" in str(e) else "model.activation"
        raise DataError(f"{key}: {e}") from None
