"""SAM, ASAM, GSAM, LookSAM and GAM over sharded parameters (FSDP): norms and inner products are sums over shards.

Under FSDP every rank holds a disjoint shard of each parameter and of its gradient, so the local
norm is not ``||g||``; :func:`sharded_global_norm` all-reduces the squared local norms and
:func:`sharded_dot` the three of an inner product's polarisation. Each variant's update is
elementwise once those are known, so every rank works on its own shards and keeps its shards of
the variant's buffers. Framework-free: only ``torch.distributed``.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .._state import local_shard as _local
from .._validation import one_of
from . import functional as F
from .sam import ASAM, NONFINITE_POLICIES, SAM
from .variants import GSAM, LookSAM, _ratio
from .variants_multi import _GAM_EPS, GAM

__all__ = [
    "ShardedASAM", "ShardedGAM", "ShardedGSAM", "ShardedLookSAM", "ShardedSAM", "sharded_dot", "sharded_global_norm",
]


def _is_dtensor(t: torch.Tensor) -> bool:
    return callable(getattr(t, "to_local", None)) and hasattr(t, "device_mesh")


def _is_flat_shard(param: torch.Tensor) -> bool:
    """A parameter that is one rank's part of a flattened whole with no layout to gather by (FSDP1)."""
    return (
        not _is_dtensor(param) and torch.distributed.is_available() and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _gathered(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``local`` is this rank's shard, sharded like ``param``; on the host.

    A collective under FSDP2 (every rank must call it, parameter by parameter in the same order); the
    tensor itself, copied, when ``param`` is not a DTensor.
    """
    if not _is_dtensor(param):
        return local.detach().clone()
    from torch.distributed.tensor import DTensor

    whole = DTensor.from_local(
        local.detach(), param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )
    return whole.full_tensor().to("cpu", copy=True)  # a copy even where the gather is the shard itself (world 1)


def _shard_of(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``whole`` (a tensor shaped like ``param``), sharded like ``param``; no communication."""
    local = _local(param)
    whole = whole.detach().to(device=local.device, dtype=local.dtype)
    if not _is_dtensor(param):
        return whole.clone(memory_format=torch.preserve_format)
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank holds the same checkpoint and slices its own part locally
    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local().clone()


def sharded_global_norm(tensors: Sequence[torch.Tensor], group: Any = None) -> torch.Tensor:
    """L2 norm of tensors sharded across the processes of ``group``: sqrt(all_reduce(sum ||g_i||^2)).

    Under FSDP every rank holds a disjoint shard of each gradient, so the local norm is not the
    norm of ``g``; this is what ``e = rho g / ||g||`` needs.
    """
    local = F.global_norm([_local(t) for t in tensors]) if len(tensors) else torch.zeros(())
    sq = local.double() ** 2
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sq, op=torch.distributed.ReduceOp.SUM, group=group)
    return sq.sqrt().to(local.dtype)


def sharded_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], group: Any = None) -> torch.Tensor:
    """Inner product ``<a, b>`` of two tensor lists sharded alike across ``group``.

    The polarisation identity of :func:`.functional.dot`, ``(||a + b||^2 - ||a||^2 - ||b||^2) / 2``,
    with the three squared norms summed over the shards in one all-reduce.
    """
    a, b = [_local(t) for t in a], [_local(t) for t in b]
    if not a:
        return torch.zeros(())
    with torch.no_grad():
        local = torch.stack([F.global_norm(torch._foreach_add(a, b)), F.global_norm(a), F.global_norm(b)])
        sq = local.double() ** 2
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sq, op=torch.distributed.ReduceOp.SUM, group=group)
        return (0.5 * (sq[0] - sq[1] - sq[2])).to(local.dtype)


class ShardedSAM:
    """SAM / ASAM over sharded parameters (FSDP), speaking the engine's protocol.

    Each shard moves by ``rho * g_shard / ||g||`` (ASAM: ``rho * T^2 g_shard / ||T g||``, Kwon et
    al. 2021, eq. 9) with the norm all-reduced across shards (:func:`sharded_global_norm`): ``e``
    is elementwise once the norm is known, so the perturbation equals unsharded SAM's. Knobs,
    defaults and their validation are the unsharded variant's (:attr:`unsharded`, e.g.
    ``SAM.knob_defaults()``; ``interval`` perturbs every ``interval``-th step only). The non-finite
    policy is SAM's (``nonfinite``, :class:`~sharpguard.optim.SAM`): ``"skip"`` (default) keeps only
    the weight backup of this rank's shards (1.0x the shard bytes) and makes a faulty step update
    nothing, decided at the base optimizer's step; ``"fallback"`` also keeps the clean gradient's
    shards (2.0x) and steps with them; both are counted in :attr:`nonfinite_counts` and warned once.
    Checkpoints follow SAM's contract (:meth:`state_dict`, :meth:`sharpguard_state_dict`, ``resume=``,
    all or nothing) in the unsharded variant's format: each kept buffer is saved whole, so the state
    dict is the same at any world size and loads into the unsharded variant too. :class:`ShardedASAM`,
    :class:`ShardedGSAM`, :class:`ShardedLookSAM` and :class:`ShardedGAM` change the update through the
    ``_after_perturbed_pass`` / ``_after_plain_pass`` hooks (and GAM's points through :meth:`advance`);
    the other variants are refused for sharded training by :meth:`~sharpguard.optim.SAMConfig.build`.
    """

    per_worker_safe = False  # the norm needs the reduced shards: the clean pass is synchronised
    sync_perturbation = True
    perturbed_points = 1
    uses_clean_gradient = False  # a variant whose update reads g keeps its shards (as the unsharded one)
    #: the unsharded variant whose knobs, defaults, validation and checkpoint format this one shares
    unsharded: ClassVar[type[SAM]] = SAM
    variant: ClassVar[str] = SAM.variant
    #: the per-parameter tensors kept across steps (saved by :meth:`sharpguard_state_dict`)
    state_buffers: ClassVar[tuple[str, ...]] = ()
    eta: float = 0.0  # ASAM's offset in T = |w| + eta; SAM(adaptive=True) keeps eta = 0

    def __init__(
        self, optimizer: torch.optim.Optimizer, rho: float, adaptive: bool = False, eta: float = 0.0,
        nonfinite: str = "skip", interval: int = 1,
    ):
        self._configure(rho=rho, adaptive=adaptive, interval=interval)
        self.eta = eta
        self._attach(optimizer, nonfinite)

    @classmethod
    def knob_defaults(cls) -> dict[str, Any]:
        """The unsharded variant's knobs and defaults (:meth:`SAM.knob_defaults`): one declaration for both."""
        return cls.unsharded.knob_defaults()

    @classmethod
    def validate_knobs(cls, **knobs: Any) -> dict[str, Any]:
        """The unsharded variant's :meth:`SAM.validate_knobs`: the same rules, pure."""
        return cls.unsharded.validate_knobs(**knobs)

    def _configure(self, **knobs: Any) -> None:
        """Validate and store the knobs by the unsharded variant's own rule (all or nothing)."""
        for name, value in self.unsharded._validated(knobs).items():
            setattr(self, name, value)

    def _knobs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.knob_defaults()}

    def _attach(self, optimizer: torch.optim.Optimizer, nonfinite: str) -> None:
        one_of("nonfinite", nonfinite, NONFINITE_POLICIES)
        self.base_optimizer = optimizer
        self.nonfinite = nonfinite
        self.sam_state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)  # param -> shards
        self._step = 0  # completed steps (the cadence of interval / LookSAM's k)
        self._backup: list[torch.Tensor] | None = None
        self._clean: list[torch.Tensor] | None = None
        self._reset_step()
        # device-side fault counters [non-finite clean gradient, non-finite perturbed gradient], as SAM's
        self._faults: torch.Tensor | None = None
        self._faults_host = torch.zeros(2, dtype=torch.int64)
        self._faults_warned = [0, 0]
        self._base_stepping = False
        self._skip_hooks = (
            optimizer.register_step_pre_hook(self._skip_faulty_step),
            optimizer.register_step_post_hook(self._base_step_done),
        )

    def _reset_step(self) -> None:
        self._params: list[torch.Tensor] = []
        self._pass_params: list[torch.Tensor] = []
        self._points_ok: torch.Tensor | None = None  # a multi-point variant's gradients before the last were finite
        self._clean_ok: torch.Tensor | None = None
        self._skip_check: tuple[list[torch.Tensor], torch.Tensor] | None = None

    def prepare(self) -> None:
        pass

    def needs_second_pass(self) -> bool:
        return self._step % self.interval == 0

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.base_optimizer.param_groups for p in g["params"]]

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for g in self.base_optimizer.param_groups for p in g["params"] if p.grad is not None]

    def perturb(self) -> bool:
        self._skip_check = None  # the previous step's base step never ran (a GradScaler skip): dropped
        if self._faults is not None:
            self._warn_about_faults()
        params = self._params_with_grad()
        if not self.needs_second_pass():
            self._pass_params = params
            return False
        local_p = [_local(p) for p in params]
        local_g = [_local(p.grad) for p in params]
        self._backup = F.save_(self._backup, local_p)
        if self.nonfinite == "fallback" or self.uses_clean_gradient:
            self._clean = F.save_(self._clean, local_g)
        self._params, self._pass_params = local_p, params
        direction, norm = F.ascent_direction(
            self._backup, local_g, adaptive=self.adaptive, eta=self.eta, norm=sharded_global_norm
        )
        self._clean_ok = torch.isfinite(norm)
        F.add_scaled_(local_p, direction, F.perturbation_scale(norm, self.rho))
        return True

    def advance(self) -> bool:
        """One perturbed point per step: there is never a next one (the engine's multi-point protocol)."""
        return False

    def unperturb(self) -> None:
        if not self._params:  # a step without a perturbed pass: the variant's own use of g
            params = self._pass_params or self._params_with_grad()
            self._after_plain_pass([_local(p.grad) for p in params])
        if self._backup is not None and self._params:
            F.restore_(self._params, self._backup)
            grads = [_local(p.grad) for p in self._pass_params]
            self._after_perturbed_pass(grads)
            ok = torch.isfinite(sharded_global_norm(grads)) & self._clean_ok
            if self._points_ok is not None:  # a multi-point variant: the gradients at its earlier points
                ok = ok & self._points_ok
            if self.nonfinite == "fallback":
                F.select_(grads, self._clean, ~ok)
            else:
                self._skip_check = (self._pass_params, ok)
                if self._base_stepping:  # the base step's closure ran this SAM step: decided now
                    self._skip_faulty_step(self.base_optimizer, (), {})
            self._count_faults(self._clean_ok, ok)
        self._params, self._pass_params, self._points_ok = [], [], None
        self._step += 1

    def _after_perturbed_pass(self, grads: list[torch.Tensor]) -> None:
        """Hook: turn the local shards of ``g(w + e)`` into the update's, in place (``self._clean``: ``g``'s)."""

    def _after_plain_pass(self, grads: list[torch.Tensor]) -> None:
        """Hook: a step without a perturbed pass (``grads``: the local shards of ``g``)."""

    def _skip_faulty_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Base optimizer step pre-hook of ``nonfinite="skip"`` (as :meth:`SAM._skip_faulty_step`)."""
        self._base_stepping = True
        check, self._skip_check = self._skip_check, None
        if check is None:
            return
        params, ok = check
        F.skip_step_(params, ok, local=_local)

    def _base_step_done(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._base_stepping = False

    def cancel(self) -> None:
        if self._backup is not None and self._params:
            F.restore_(self._params, self._backup)
        self._params, self._pass_params, self._points_ok = [], [], None

    # SAM's fault counters and their warning, read the same way (one host sync, only when asked)
    nonfinite_counts = SAM.nonfinite_counts
    _count_faults = SAM._count_faults
    _warn_about_faults = SAM._warn_about_faults

    # ------------------------------------------------------------------ checkpoints (SAM's contract)
    # The unsharded variant's format: a buffer is saved whole (the shards of every rank gathered), indexed
    # like the base optimizer's parameters, so the state dict does not depend on the world size, every
    # rank's copy is complete (frameworks that write rank 0's alone lose nothing), and it is the unsharded
    # variant's own. Saving is a collective under FSDP2: every rank calls it. Loading slices locally.
    state_dict = SAM.state_dict
    load_state_dict = SAM.load_state_dict
    load_sharpguard_state_dict = SAM.load_sharpguard_state_dict
    _checked_own_state = SAM._checked_own_state

    def sharpguard_state_dict(self) -> dict[str, Any]:
        """The wrapper's own state, as :meth:`SAM.sharpguard_state_dict`: variant, step, knobs, buffers (whole).

        Plain containers and tensors on the host (``torch.load(weights_only=True)`` reads it); under FSDP2
        every rank must call it (each buffer is gathered from the shards, one parameter at a time).
        """
        buffers: dict[str, dict[int, torch.Tensor]] = {name: {} for name in self.state_buffers}
        flat_shards = []
        for i, p in enumerate(self._all_params()):
            kept = self.sam_state.get(p, {})
            for name in self.state_buffers:
                if name in kept:
                    if _is_flat_shard(p):
                        flat_shards.append(name)
                    else:
                        buffers[name][i] = _gathered(p, kept[name])
        if flat_shards:
            warnings.warn(
                f"{type(self).__name__}: this rank's parameters are flat shards without their layout (FSDP1), so "
                f"{', '.join(sorted(set(flat_shards)))} cannot be saved whole and is left out: a resume starts it "
                "from zero (the next SAM step rebuilds it). Shard with fully_shard (FSDP2) to save it.",
                UserWarning,
                stacklevel=2,
            )
        return {"variant": self.variant, "step": self._step, "knobs": self._knobs(), "buffers": buffers}

    def _load_own(self, ours: dict[str, Any] | None) -> None:
        """Install a state checked by :meth:`_checked_own_state` (each rank keeps its shard of each buffer)."""
        self.sam_state.clear()
        self._reset_step()
        if ours is None:
            self._step = 0
            return
        self._configure(**ours["knobs"])
        self._step = ours["step"]
        params = self._all_params()
        for name, entries in ours["buffers"].items():
            for i, tensor in entries.items():
                self.sam_state[params[i]][name] = _shard_of(params[i], tensor)


class ShardedASAM(ShardedSAM):
    r"""ASAM (Kwon et al., ICML 2021, eq. 9) over sharded parameters: :class:`~.sam.ASAM`'s knobs
    (``rho``, ``eta``, ``interval``) and defaults, ``T = |w| + eta`` applied to each shard elementwise."""

    unsharded, variant = ASAM, ASAM.variant

    def __init__(
        self, optimizer: torch.optim.Optimizer, rho: float = 0.5, eta: float = 0.01, interval: int = 1,
        nonfinite: str = "skip",
    ):
        self._configure(rho=rho, eta=eta, interval=interval)
        self._attach(optimizer, nonfinite)


class ShardedGSAM(ShardedSAM):
    r"""GSAM (Zhuang et al., ICLR 2022, Algorithm 1) over sharded parameters: :class:`~.variants.GSAM`'s update.

    The step is :math:`(1 + \alpha c)\, g_p - \alpha g` with :math:`c = \langle g, g_p\rangle / \lVert g_p\rVert^2`;
    elementwise once the inner product and the norm are known, which are all-reduced over the shards
    (:func:`sharded_dot`, :func:`sharded_global_norm`). Keeps this rank's shards of the weight backup
    and of the clean gradient: 2.0x the shard bytes, as GSAM keeps 2.0x the parameter bytes.
    """

    uses_clean_gradient = True
    unsharded, variant = GSAM, GSAM.variant

    def __init__(
        self, optimizer: torch.optim.Optimizer, rho: float, alpha: float, adaptive: bool = False,
        nonfinite: str = "skip",
    ):
        self._configure(rho=rho, alpha=alpha, adaptive=adaptive)
        self._attach(optimizer, nonfinite)

    def _after_perturbed_pass(self, grads: list[torch.Tensor]) -> None:
        clean = self._clean
        assert clean is not None
        c = _ratio(sharded_dot(clean, grads), sharded_global_norm(grads).square())
        F.scale_(grads, 1.0 + self.alpha * c)
        torch._foreach_add_(grads, clean, alpha=-self.alpha)


class ShardedLookSAM(ShardedSAM):
    r"""LookSAM (Liu et al., CVPR 2022, Algorithm 1) over sharded parameters: :class:`~.variants.LookSAM`'s update.

    Every ``k``-th step runs SAM and keeps this rank's shards of
    :math:`g_v = g_s - \frac{\langle g, g_s\rangle}{\lVert g\rVert^2} g` (kept only when finite); the other
    steps run one pass and step with :math:`g + \alpha \frac{\lVert g\rVert}{\lVert g_v\rVert} g_v`.
    Inner products and norms are all-reduced over the shards, the rest is elementwise. Keeps the
    weight backup, the clean gradient and :math:`g_v` per shard: LookSAM's buffers over the world.
    """

    uses_clean_gradient = True
    unsharded, variant = LookSAM, LookSAM.variant
    state_buffers = ("gv",)

    def __init__(
        self, optimizer: torch.optim.Optimizer, rho: float, k: int, alpha: float, adaptive: bool = False,
        nonfinite: str = "skip",
    ):
        self._configure(rho=rho, k=k, alpha=alpha, adaptive=adaptive)
        self._attach(optimizer, nonfinite)

    @property
    def interval(self) -> int:  # type: ignore[override]
        """SAM's cadence: a perturbed pass every ``k``-th step (:attr:`LookSAM.interval`)."""
        return self.k

    def _gv_of(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's shard of each parameter's ``g_v`` (zeros where none is kept yet)."""
        out = []
        for p in params:
            state = self.sam_state[p]
            if "gv" not in state:
                state["gv"] = torch.zeros_like(_local(p), memory_format=torch.preserve_format)
            out.append(state["gv"])
        return out

    def _after_perturbed_pass(self, grads: list[torch.Tensor]) -> None:
        clean = self._clean
        assert clean is not None
        c = _ratio(sharded_dot(clean, grads), sharded_global_norm(clean).square())
        gv_new = torch._foreach_neg(clean)
        F.scale_(gv_new, c)
        torch._foreach_add_(gv_new, grads)  # g_s - c g
        ok = torch.isfinite(sharded_global_norm(gv_new))
        F.select_(self._gv_of(self._pass_params), gv_new, ok)  # keep the old g_v after an overflow

    def _after_plain_pass(self, grads: list[torch.Tensor]) -> None:
        params = self._pass_params or self._params_with_grad()
        if not params or self.needs_second_pass():  # a full step that had nothing to perturb
            return
        gv = self._gv_of(params)
        # zero when the clean gradient is not finite: alpha ||g|| / ||g_v|| would spread an inf everywhere
        norm = sharded_global_norm(grads)
        finite = torch.isfinite(norm)
        factor = self.alpha * _ratio(torch.where(finite, norm, torch.zeros_like(norm)), sharded_global_norm(gv))
        F.add_scaled_(grads, gv, factor)
        self._count_faults(finite, None)  # counted and said, as on a step with a perturbed pass (LookSAM)


class ShardedGAM(ShardedSAM):
    r"""GAM (Zhang et al., CVPR 2023; the official code's GAM + SAM form) over sharded parameters:
    :class:`~.variants_multi.GAM`'s four gradients and update.

    Points :math:`w + \rho g_0/\lVert g_0\rVert`, :math:`w_2 = w + \rho' (g_1 - g_0)/\lVert g_1 - g_0\rVert`
    and :math:`w_2 + \rho g_2/\lVert g_2\rVert`; update
    :math:`d - \gamma (m - \cos(m, d) \lVert m\rVert d/\lVert d\rVert)`
    with :math:`d = \beta_1 g_1 + \beta_3 g_3`, :math:`m = g_0 + |\beta_2| g_2`. Every norm and inner
    product is all-reduced over the shards; every other operation is elementwise on this rank's
    shards, which keep GAM's buffers (weight backup, :math:`g_0`, :math:`g_1`, :math:`g_2`, :math:`w_2 - w`).
    """

    uses_clean_gradient = True
    perturbed_points = 3
    unsharded, variant = GAM, GAM.variant

    def __init__(
        self, optimizer: torch.optim.Optimizer, rho: float, rho_norm: float, beta1: float, beta2: float,
        beta3: float, gamma: float, adaptive: bool = False, nonfinite: str = "skip",
    ):
        self._configure(
            rho=rho, rho_norm=rho_norm, beta1=beta1, beta2=beta2, beta3=beta3, gamma=gamma, adaptive=adaptive
        )
        self._attach(optimizer, nonfinite)
        self._point = 0
        self._g1: list[torch.Tensor] | None = None
        self._g2: list[torch.Tensor] | None = None
        self._offset: list[torch.Tensor] | None = None

    def perturb(self) -> bool:
        self._point = 0
        return super().perturb()

    @torch.no_grad()
    def advance(self) -> bool:
        """After the backward at a point: restore ``w`` by copy and move to the next point, if any."""
        if not self._params or self._point + 1 >= self.perturbed_points:
            return False
        params, grads = self._params, [_local(p.grad) for p in self._pass_params]
        ok = torch.isfinite(sharded_global_norm(grads))
        self._points_ok = ok if self._points_ok is None else self._points_ok & ok
        F.restore_(params, self._backup)
        self._point += 1
        if self._point == 1:  # ascend on the gradient norm along g_1 - g_0, from w
            self._g1 = F.save_(self._g1, grads)
            offset = self._offset = F.save_(self._offset, grads)
            torch._foreach_sub_(offset, self._clean)
            directions, norm = F.ascent_direction(params, offset, adaptive=self.adaptive, norm=sharded_global_norm)
            if directions is not offset:  # adaptive: T^2 (g_1 - g_0)
                torch._foreach_copy_(offset, directions)
            F.scale_(offset, F.perturbation_scale(norm, self.rho_norm, eps=_GAM_EPS))
            torch._foreach_add_(params, offset)
            return True
        # SAM's ascent along g_2, taken from w_2 (rebuilt bitwise from w and the kept offset)
        g2 = self._g2 = F.save_(self._g2, grads)
        torch._foreach_add_(params, self._offset)
        directions, norm = F.ascent_direction(params, g2, adaptive=self.adaptive, norm=sharded_global_norm)
        F.add_scaled_(params, directions, F.perturbation_scale(norm, self.rho, eps=_GAM_EPS))
        return True

    def _after_perturbed_pass(self, grads: list[torch.Tensor]) -> None:
        if self._point + 1 < self.perturbed_points:
            raise RuntimeError(
                f"ShardedGAM's step ended after {self._point + 1} of its {self.perturbed_points} perturbed points; "
                "run the backward at each point while advance() returns True (SAMEngine does)."
            )
        # grads holds g_3: d = beta1 g_1 + beta3 g_3, m = g_0 + |beta2| g_2 (g_2's buffer reused for m)
        torch._foreach_mul_(grads, self.beta3)
        torch._foreach_add_(grads, self._g1, alpha=self.beta1)
        if self.gamma == 0.0:
            return
        m = self._g2
        torch._foreach_mul_(m, abs(self.beta2))
        torch._foreach_add_(m, self._clean)
        d_norm, m_norm = sharded_global_norm(grads), sharded_global_norm(m)
        cosine = sharded_dot(m, grads) / (d_norm * m_norm + _GAM_EPS)
        F.scale_(grads, 1.0 + self.gamma * cosine * m_norm / (d_norm + _GAM_EPS))
        torch._foreach_add_(grads, m, alpha=-self.gamma)
