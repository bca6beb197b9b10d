"""Sharpness-Aware Minimization (Foret et al., ICLR 2021) around any ``torch.optim`` optimizer.

:class:`SAM` is the front end shared by every variant. It owns no update rule: it moves the
weights to ``w + e`` between two forward/backward passes, puts ``w`` back **by copy** (bitwise),
and lets the base optimizer step with the gradient taken at ``w + e``. The per-step work is the
foreach kernel of :mod:`.functional` (no Python loop of tensor operations over parameters, no
``.item()``), with its buffers kept across steps.

Every variant speaks one protocol, used by :meth:`SAM.step` and by the framework adapters that run
the passes themselves::

    opt.prepare()            # before the forward (Momentum-SAM perturbs here; a no-op otherwise)
    loss.backward()          # clean gradient at w
    if opt.perturb():        # save w, move to w + e, snapshot running statistics
        release the grads (None); loss_at_w_plus_e.backward()
    opt.unperturb()          # restore w by copy, leave in .grad the gradient to step with
    opt.base_optimizer.step()

``perturb()`` returns False on steps that need no second pass (LookSAM's reuse steps, the skipped
steps of ``interval > 1``); ``needs_second_pass()`` says so before the first forward, which is what
a DDP adapter needs to decide whether the first pass may skip the gradient all-reduce.

A variant that needs gradients at several perturbed points per step (GAM: three) is driven by
one more call after the backward at each point::

    if opt.perturb():
        while True:
            release the grads (None); loss_at_current_point.backward()
            if not opt.advance():    # the variant copied the gradient, moved to its next point
                break
    opt.unperturb()

``advance()`` returns False at once for every single-point variant (no work, nothing changes).
When it returns True the variant has kept what it needs of the gradient at the point just
visited and moved the weights to its next point, always from ``w`` restored by copy.

The protocol is stated once as a structural type (:class:`~sharpguard.optim.protocol.SAMStepProtocol`)
and driven by the step engine (:mod:`sharpguard.optim.engine`), which :meth:`SAM.step` and every
adapter use; the fault policy and the checkpoint format live beside this module
(:mod:`sharpguard.optim._faults`, :mod:`sharpguard.optim._checkpoint`).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from .._modules import is_data_parallel, unwrap_data_parallel
from .._validation import check_keywords, keywords_of
from ..errors import ConfigurationError
from . import functional as F
from ._checkpoint import RESUME_POLICIES, STATE_KEY, CheckpointMixin  # noqa: F401 (importable from here)
from ._faults import NONFINITE_POLICIES, NonfinitePolicyMixin, SAMFallbackWarning
from .engine import SAMEngine, perturbed_pass
from .. import _validation as rules
from . import registry

__all__ = ["SAM", "ASAM", "Closure", "perturbed_pass", "NONFINITE_POLICIES", "SAMFallbackWarning"]

Closure = Callable[[], Any]

from .._validation import in_unit_interval as _in_unit_interval  # noqa: F401 (re-exported to variants)
from .._validation import non_negative as _non_negative
from .._validation import one_of as _one_of
from .._validation import positive_int as _positive_int


def _rho(value: Any) -> float:
    return _non_negative("rho", value, "; the neighbourhood radius of SAM is usually 0.05 (ASAM: 0.5)")


def _check_optimizer(optimizer: Any, cls_name: str) -> None:
    if isinstance(optimizer, SAM):
        raise ConfigurationError(
            f"{cls_name}.wrap() got an optimizer that is already a {type(optimizer).__name__}; "
            "wrap the base optimizer (its .base_optimizer) instead."
        )
    if not isinstance(optimizer, Optimizer):
        raise ConfigurationError(
            f"{cls_name}.wrap() needs a torch.optim.Optimizer instance, got {type(optimizer).__name__}; "
            "unwrap framework wrappers first (e.g. Accelerate's AcceleratedOptimizer.optimizer)."
        )


def _build_base(cls: type[SAM], params: Any, base_cls: Any, base_kwargs: dict[str, Any]) -> Optimizer:
    cls_name = cls.__name__
    if not (isinstance(base_cls, type) and issubclass(base_cls, Optimizer)):
        raise ConfigurationError(
            f"{cls_name} needs a torch.optim.Optimizer subclass as base_optimizer_cls (e.g. torch.optim.SGD), "
            f"got {base_cls!r}; to wrap an optimizer you already built use {cls_name}.wrap(optimizer)."
        )
    if issubclass(base_cls, SAM):
        raise ConfigurationError(f"{cls_name} cannot use another SAM wrapper ({base_cls.__name__}) as its "
                                 "base optimizer.")
    if isinstance(params, torch.Tensor):
        raise ConfigurationError(
            f"{cls_name} needs an iterable of parameters (e.g. model.parameters()), got a single tensor; wrap it in a "
            "list."
        )
    params = list(params)
    if not params:
        raise ConfigurationError(
            f"{cls_name} got an empty parameter list; pass model.parameters() of a model with parameters."
        )
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    if tensors and all(isinstance(t, torch.Tensor) and not t.requires_grad for t in tensors):
        raise ConfigurationError(
            f"{cls_name} got only parameters that do not require grad (a frozen model): nothing would train; "
            "unfreeze the parameters to train, or pass only the trainable ones."
        )
    # A keyword neither SAM nor the base optimizer takes is reported here, by SAM, with both lists
    # (not as the base optimizer's bare TypeError).
    signature = inspect.signature(base_cls.__init__).parameters.values()
    if not any(p.kind == p.VAR_KEYWORD for p in signature):
        base_keywords = keywords_of(base_cls.__init__, exclude=("self", "params"))
        ours = [*_knob_defaults(cls), "model", "sync_perturbation", "nonfinite"]
        unknown = sorted(set(base_kwargs) - set(base_keywords))
        if unknown:
            close = [m for name in unknown for m in difflib.get_close_matches(name, ours + base_keywords, n=1)]
            raise ConfigurationError(
                f"{cls_name} got {', '.join(map(repr, unknown))}, which neither {cls_name} ({', '.join(ours)}) nor "
                f"its base optimizer {base_cls.__name__} ({', '.join(base_keywords)}) takes"
                + (f"; did you mean {', '.join(map(repr, close))}?" if close else ".")
            )
    return base_cls(params, **base_kwargs)


@functools.cache
def _knob_defaults(cls: type) -> dict[str, Any]:
    """name -> default of each keyword of ``cls._configure``: a variant's declared knobs (read-only)."""
    return {p.name: p.default for p in _knob_parameters(cls)}


@functools.cache
def _knob_parameters(cls: type) -> tuple[inspect.Parameter, ...]:
    """The keyword parameters of ``cls._configure`` (a classmethod: ``cls`` is bound, not listed)."""
    return tuple(p for p in inspect.signature(cls._configure).parameters.values() if p.kind is p.KEYWORD_ONLY)


def _check_run_settings(model: Any, sync_perturbation: Any, nonfinite: Any) -> None:
    """The settings every variant takes besides its knobs, by the rules every front end uses."""
    if model is not None:
        rules.module("model", model)
    rules.flag("sync_perturbation", sync_perturbation)
    _one_of("nonfinite", nonfinite, NONFINITE_POLICIES)


class _Built:
    """An optimizer the user built already, handed by :meth:`SAM.wrap` to the one constructor."""

    __slots__ = ("optimizer",)

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer


def _declare_constructor(cls: type[SAM]) -> None:
    """Give ``cls`` a constructor whose signature lists its knobs (from ``_configure``) with their defaults.

    ``inspect.signature``, ``help()`` and the argument enumeration of the tests read it; the work is
    :meth:`SAM.__init__`'s, shared by every variant. A class that writes its own ``__init__`` (or
    inherits one) keeps it.
    """
    if not isinstance(inspect.getattr_static(cls, "_configure"), classmethod):
        raise TypeError(
            f"{cls.__qualname__}._configure must be a classmethod that validates the knobs and returns the "
            "attributes to store (see SAM._configure)."
        )
    own = cls.__init__  # the class's own, or the nearest in its bases
    if own is not _construct and not getattr(own, "_declared_for", None):
        return
    P = inspect.Parameter
    base_default = cls.default_base_optimizer if cls.default_base_optimizer is not None else P.empty
    signature = inspect.Signature([
        P("self", P.POSITIONAL_OR_KEYWORD),
        P("params", P.POSITIONAL_OR_KEYWORD, annotation="Iterable[torch.Tensor] | Iterable[dict[str, Any]]"),
        P("base_optimizer_cls", P.POSITIONAL_OR_KEYWORD, default=base_default, annotation="type[Optimizer]"),
        *_knob_parameters(cls),
        P("model", P.KEYWORD_ONLY, default=None, annotation="nn.Module | None"),
        P("sync_perturbation", P.KEYWORD_ONLY, default=False, annotation="bool"),
        P("nonfinite", P.KEYWORD_ONLY, default="skip", annotation="str"),
        P("base_kwargs", P.VAR_KEYWORD, annotation="Any"),
    ], return_annotation="None")

    def __init__(self: SAM, *args: Any, **kwargs: Any) -> None:
        _construct(self, *args, **kwargs)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__module__ = cls.__module__
    __init__.__doc__ = f"Build {cls.__name__} around a new base optimizer (its knobs: see the class docstring)."
    __init__._declared_for = cls  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]


def _running_stat_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, buffer name) of every buffer of every module that keeps running statistics.

    A module counts when one of its own buffers is named ``running_*`` or ``num_batches_tracked``:
    every ``_BatchNorm``, ``SyncBatchNorm``, ``InstanceNorm(track_running_stats=True)`` and custom
    normalisation layers that follow the convention; all of that module's buffers are kept.
    """
    slots = []
    for module in model.modules():
        names = [name for name, buf in module.named_buffers(recurse=False) if buf is not None]
        if any(n.startswith("running_") or n == "num_batches_tracked" for n in names):
            slots.extend((module, n) for n in names)
    return slots


# --------------------------------------------------------------------------------------------------
# SAM
# --------------------------------------------------------------------------------------------------
class SAM(NonfinitePolicyMixin, CheckpointMixin, Optimizer):
    r"""Sharpness-Aware Minimization (Foret et al., ICLR 2021, arXiv:2010.01412) around a base optimizer.

    Each step computes the clean gradient :math:`g = \nabla L(w)`, moves to
    :math:`w + e` with :math:`e = \rho\, g / \lVert g \rVert_2` (eq. 2), takes the gradient there,
    restores :math:`w` by copy, and lets the base optimizer step with :math:`\nabla L(w + e)` (eq. 3).
    ``adaptive=True`` uses ASAM's scale-invariant neighbourhood with ``eta = 0`` (the form of
    davda54/sam); :class:`ASAM` has the paper's ``eta``.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        base_optimizer_cls: the optimizer class that takes the step (``torch.optim.SGD``, ``AdamW``, ...).
        rho: neighbourhood radius (>= 0). ``rho=0`` reproduces the base optimizer bitwise.
        adaptive: ASAM's element-wise scaling ``T = |w|`` (Kwon et al., 2021).
        interval: perturb every ``interval``-th step only, a plain step otherwise (composer's "SAM
            every k steps"; cost ``1 + 1/interval`` passes per step). Composer raises ``rho`` with k.
        model: the model (or its DDP wrapper). Running statistics (BatchNorm and any module with
            ``running_*`` buffers) are snapshotted after the clean pass and restored after the
            perturbed one, so they come from the unperturbed pass only. For a
            ``DistributedDataParallel`` model, :meth:`step` runs the clean pass under ``no_sync()``:
            each worker perturbs with its own gradient (the paper's m-sharpness).
        sync_perturbation: all-reduce the clean gradient too (one perturbation for all workers).
            Variants whose update uses the clean gradient (GSAM, LookSAM, Friendly-SAM;
            ``per_worker_safe = False``) always do.
        nonfinite: what a step does with a non-finite gradient (docs/reliability.md). ``"skip"``
            (default): a step whose clean or perturbed gradient is not finite updates nothing. It
            is decided when the base optimizer steps (a step pre-hook), so a GradScaler sees the
            non-finite gradient first and skips and backs off as without SAM. Otherwise, where the
            flag is free to read (CPU tensors), every gradient is set to ``None`` and the base
            optimizer leaves weights and state alone; on an accelerator (and for fake tensors) the
            decision stays on the device, without a host sync: the gradients become zero, so the
            base optimizer takes a zero-gradient step (no change under plain SGD; momentum and Adam
            moments decay by one step). Extra memory: the weight backup only (1.0x the parameters). ``"fallback"``: a
            non-finite clean gradient gives no perturbation and the base optimizer gets that clean gradient, exactly as
            without SAM; a non-finite perturbed gradient is replaced by the clean one. It keeps a
            copy of the clean gradient, one more parameter-sized buffer (2.0x in all). Both are
            counted (:attr:`nonfinite_counts`) and warned once; neither adds a host sync.
        **base_kwargs: the base optimizer's own arguments (``lr``, ``momentum``, ...).

    ``param_groups`` and ``state`` *are* the base optimizer's (LR schedulers attached to either work);
    ``state_dict()`` is the base optimizer's plus one ``"sharpguard"`` entry (step counter, knobs,
    variant buffers), so the base optimizer can load it too.
    """

    variant: ClassVar[str] = "sam"
    #: names of the per-parameter tensors a variant keeps across steps (saved in state_dict)
    state_buffers: ClassVar[tuple[str, ...]] = ()
    #: ASAM's offset in ``T = |w| + eta``; SAM(adaptive=True) keeps davda54's eta = 0
    eta: float = 0.0
    #: whether each DDP worker may perturb with its own (unsynchronised) clean gradient. False for
    #: variants whose update or persistent state uses the clean gradient (GSAM, LookSAM,
    #: Friendly-SAM): an unsynchronised one would make the replicas (or their saved state) diverge.
    per_worker_safe: ClassVar[bool] = True
    #: perturbed points per step (gradients taken away from ``w``); more than one needs :meth:`advance`,
    #: which ``step(closure)`` and the framework adapters call and the two-step form cannot
    perturbed_points: ClassVar[int] = 1
    #: whether the variant's own update reads the clean gradient (GSAM, LookSAM, WSAM, RWP, GAM,
    #: bSAM): it then keeps a copy of it whatever the fault policy; SAM keeps one only under
    #: ``nonfinite="fallback"``
    uses_clean_gradient: ClassVar[bool] = False

    #: other names :func:`~sharpguard.optim.make_sam` accepts for this variant (case and ``-``/``_`` free)
    aliases: ClassVar[tuple[str, ...]] = ()
    #: the base optimizer class used when the constructor is given none (None: it must be given)
    default_base_optimizer: ClassVar[type[Optimizer] | None] = None
    #: knob name -> rule, for knobs whose name means something else here than in ``_validation.KNOBS``
    knob_rules: ClassVar[dict[str, Callable[[str, Any], Any]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _declare_constructor(cls)
        registry.register(cls)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[Optimizer] | None = None,
        *,
        model: nn.Module | None = None,
        sync_perturbation: bool = False,
        nonfinite: str = "skip",
        **kwargs: Any,
    ) -> None:
        # The one constructor of every variant: ``kwargs`` holds the variant's knobs (the keywords of its
        # ``_configure``) and the base optimizer's arguments. Everything is checked before anything is built.
        cls = type(self)
        declared = _knob_defaults(cls)
        knobs = {name: kwargs.pop(name) for name in list(kwargs) if name in declared}
        if isinstance(params, _Built):  # from wrap(): an optimizer built already
            check_keywords(
                cls.__name__, kwargs, declared, " (base-optimizer arguments belong to the optimizer you wrap)"
            )
        values = cls._validated(knobs)
        _check_run_settings(model, sync_perturbation, nonfinite)
        if isinstance(params, _Built):
            base = params.optimizer
        else:
            if base_optimizer_cls is None:
                base_optimizer_cls = cls.default_base_optimizer
            base = _build_base(cls, params, base_optimizer_cls, kwargs)
        self._store(values)
        self._attach(base, model, sync_perturbation, nonfinite)

    @classmethod
    def _configure(cls, *, rho: float = 0.05, adaptive: bool = False, interval: int = 1) -> dict[str, Any]:
        """The variant's knobs, declared once: the keyword defaults are the constructor's and every front
        end's. Validates them (no instance needed) and returns the attributes to store: every knob,
        normalised, and any value derived from them."""
        return {"rho": _rho(rho), "adaptive": bool(adaptive), "interval": _positive_int("interval", interval)}

    @classmethod
    def _validated(cls, knobs: dict[str, Any]) -> dict[str, Any]:
        """The attributes ``_configure`` derives from ``knobs`` (missing ones at their defaults), after each
        given value passed the rule of its name (``knob_rules``, else ``_validation.KNOBS``)."""
        for p in _knob_parameters(cls):
            if p.name not in knobs:
                continue
            value = knobs[p.name]
            rule = cls.knob_rules.get(p.name) or rules.KNOBS.get(p.name)
            if rule is None or (value is None and (p.default is None or "None" in str(p.annotation))):
                continue
            rule(p.name, value)
        return cls._configure(**knobs)

    @classmethod
    def validate_knobs(cls, **knobs: Any) -> dict[str, Any]:
        """Every knob of this variant with its value, validated by the constructor's rules: the given
        ones normalised, the others at their defaults. Pure: builds and changes nothing; raises
        :class:`~sharpguard.errors.ConfigurationError` on an unknown knob or a bad value."""
        check_keywords(cls.__name__, knobs, _knob_defaults(cls))
        values = cls._validated(knobs)
        return {name: values[name] for name in _knob_defaults(cls)}

    @classmethod
    def wrap(
        cls,
        optimizer: Optimizer,
        *,
        model: nn.Module | None = None,
        sync_perturbation: bool = False,
        nonfinite: str = "skip",
        **knobs: Any,
    ) -> SAM:
        """Wrap an optimizer you already built; ``knobs`` are the constructor's (``rho``, ``adaptive``, ...)."""
        _check_optimizer(optimizer, cls.__name__)
        return cls(_Built(optimizer), model=model, sync_perturbation=sync_perturbation, nonfinite=nonfinite, **knobs)

    @classmethod
    def knob_defaults(cls) -> dict[str, Any]:
        """The variant's knobs and their defaults: the one declaration every front end reads.

        It is the keyword signature of ``_configure`` (which also validates them), so the wrapper,
        :func:`~sharpguard.optim.make_sam`, the Lightning callback, the Hugging Face Trainer and the
        Accelerate helper cannot disagree on a default (ASAM's ``rho`` is 0.5 everywhere).
        """
        return dict(_knob_defaults(cls))

    @classmethod
    def _cost_of(cls, knobs: dict[str, Any]) -> tuple[float, float]:
        """Average (forward, backward) passes per step with these (validated) knobs."""
        n = 1.0 + 1.0 / knobs.get("interval", 1)
        return (n, n)

    def _knobs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.knob_defaults()}

    def __setattr__(self, name: str, value: Any) -> None:
        # A knob assigned between steps (``opt.rho = 0.1``, a rho schedule) is validated by the same
        # rule as at construction, before it takes effect: ``opt.rho = nan`` raises, nothing changes.
        # Private names (the step's own bookkeeping, about 25 per step) are never knobs: set at once.
        if name[0] != "_":
            knobs = _knob_defaults(type(self))
            if name in knobs:
                self._apply_knobs(**{**self._knobs(), name: value})
                return
            if name == "rho":  # a radius schedule written for SAM would silently do nothing here
                raise ConfigurationError(
                    f"{type(self).__name__} has no setting 'rho'; its settings are {', '.join(knobs)}."
                )
        object.__setattr__(self, name, value)

    def _apply_knobs(self, **knobs: Any) -> None:
        """Validate ``knobs`` by the constructor's rules, then store them (all or nothing)."""
        self._store(type(self)._validated(knobs))

    def _store(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _validate_base(self, base: Optimizer) -> None:
        """Hook: refuse a base optimizer the variant cannot work with (before anything is attached)."""

    def _attach(self, base: Optimizer, model: nn.Module | None, sync_perturbation: bool,
                nonfinite: str = "skip") -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigurationError(f"model must be a torch.nn.Module (or None), got {type(model).__name__}.")
        _one_of("nonfinite", nonfinite, NONFINITE_POLICIES)
        self._validate_base(base)
        self.nonfinite = nonfinite
        self.base_optimizer = base
        # The hook tables and step profiling of torch.optim.Optimizer, without its own param_groups
        # and state: those are properties that return the base optimizer's.
        Optimizer.__setstate__(self, {"defaults": base.defaults})
        self.model = model
        self.sync_perturbation = bool(sync_perturbation)
        self._ddp = model if is_data_parallel(model) else None
        self._stat_slots = _running_stat_slots(model) if model is not None else []
        self.sam_state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)
        self._scratch: dict[str, tuple[list[torch.Tensor], list[int], list[torch.Tensor]]] = {}
        self._step = 0
        self._attach_fault_policy(base)
        self._reset_step()

    # ---------------------------------------------------------------------------- shared structure
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    @property
    def state(self) -> defaultdict:  # type: ignore[override]
        return self.base_optimizer.state

    @state.setter
    def state(self, value: defaultdict) -> None:
        self.base_optimizer.state = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        Optimizer.__setstate__(self, state)

    def __repr__(self) -> str:
        if "base_optimizer" not in self.__dict__:  # refused while being built (an error message's repr)
            return f"{type(self).__name__}(<not built>)"
        knobs = ", ".join(f"{k}={v!r}" for k, v in self._knobs().items())
        base = "\n".join("    " + line for line in repr(self.base_optimizer).splitlines())
        return f"{type(self).__name__}({knobs},\n  base_optimizer=\n{base}\n)"

    @property
    def cost(self) -> tuple[float, float]:
        """Average (forward, backward) passes per step; a plain optimizer step is (1, 1)."""
        return type(self)._cost_of(self._knobs())

    # ------------------------------------------------------------------------------ the protocol
    def needs_second_pass(self) -> bool:
        """Whether this step runs a perturbed pass (known before the first forward)."""
        return self._step % self.interval == 0

    def prepare(self) -> None:
        """Before the forward of a step. A no-op except for :class:`MomentumSAM`."""
        self._prepared = True

    @property
    def keeps_clean_gradient(self) -> bool:
        """Whether a step copies the clean gradient (the variant reads it, or ``nonfinite="fallback"``)."""
        return self.uses_clean_gradient or self.nonfinite == "fallback"

    def reserve_buffers(self) -> None:
        """Allocate the step's scratch (the weight backup and, where kept, the clean-gradient copy)
        before the clean forward, once; later steps reuse it.

        Why before the forward: allocated in :meth:`perturb` instead -- after the clean backward, when
        the freed activations sit at the top of the allocator's heap -- these long-lived blocks land
        above that free space and keep the heap from shrinking, so the perturbed pass's activations
        grow it again and the step's peak rises by far more than the two buffers. The engine calls
        this before :meth:`prepare`.
        """
        if not self.needs_second_pass():
            return
        params = [p for p in self._all_params() if p.requires_grad]
        if params and all(p.layout == torch.strided for p in params):
            self._buffers("w", params)
            if self.keeps_clean_gradient:
                self._buffers("clean_grad", params)

    @torch.no_grad()
    def perturb(self) -> bool:
        """After the clean backward: save ``w``, move to ``w + e``, snapshot running statistics.

        Returns False (weights untouched) when this step needs no perturbed pass or no parameter
        has a gradient. The gradients are spent (the adaptive form builds its direction in them):
        release or zero them before the perturbed backward (``first_step(zero_grad=True)`` and
        :meth:`step` do); what the variant needs from the clean gradient has been copied.
        """
        if self._perturb_called:
            raise ConfigurationError(
                f"{type(self).__name__}.perturb() was called twice in one step; call unperturb() after the "
                "perturbed backward (or cancel()) before perturbing again."
            )
        self._skip_check = None  # the previous step's base step never ran (a GradScaler skip): dropped
        params = self._params_with_grad()
        groups = self._groups_of(params)  # also refuses sparse gradients, once per parameter list
        if self._faults is not None:
            self._warn_about_faults()
        self._perturb_called, self._pass_params = True, params
        if not params:
            self._warn_once("no_grad", "a step found no gradient at all (did the loss call backward(), and does any "
                            "parameter of this optimizer take part in it?); nothing was perturbed")
            return False
        if not self.needs_second_pass():
            return False
        grads = [p.grad for p in params]
        self._pass_groups = groups  # gradients share their parameters' device and dtype
        clean = None
        if self.keeps_clean_gradient:  # read by the variant's update, or by the non-finite fallback
            clean = self._buffers("clean_grad", params)
            torch._foreach_copy_(clean, grads)
        directions, scale = self._ascent(params, grads)
        # A non-finite clean gradient gives no perturbation: the scale is 0 (perturbation_scale), and
        # the few weights that 0 * inf still poisons are restored by copy before anything steps.
        norm = self.__dict__.pop("_ascent_norm", None)  # SAM's own ascent leaves ||g|| (or ||T g||) here
        if norm is not None:
            self._clean_ok = torch.isfinite(norm)
        else:  # a variant's own ascent (ESAM, RWP, bSAM): read before w moves; grads are not moved
            self._clean_ok = F.all_finite(grads if clean is None else clean, groups=groups)
        self._move(params, directions, scale)
        self._snapshot_stats()
        self._perturbed = True
        return True

    @torch.no_grad()
    def unperturb(self) -> None:
        """After the perturbed backward (or right after ``perturb()`` returned False).

        Restores ``w`` (and the running statistics) by copy and leaves in ``.grad`` the gradient
        the base optimizer must use; advances the variant's step counter. Call
        ``base_optimizer.step()`` (or ``scaler.step(opt.base_optimizer)``) next.
        """
        if self._perturbed and self._point < self.perturbed_points - 1:
            seen = self._point + 1
            self.cancel()  # w back by copy: a step with some of its points missing is no step of this variant
            raise ConfigurationError(
                f"{type(self).__name__}.unperturb() came after {seen} of its {self.perturbed_points} perturbed points; "
                "after the backward at each point call advance() and, while it returns True, backward again "
                "(step(closure) and the framework adapters do it for you)."
            )
        params = self._pass_params if self._perturb_called else self._params_with_grad()
        perturbed = self._perturbed
        self._skip_check = None
        self._restore()
        grads = self._grads_of(params)
        if perturbed:
            self._after_perturbed_pass(params, grads)
            self._apply_nonfinite_policy(params, grads)
        else:
            # a step without a perturbed pass is the base optimizer's own step on its own gradient:
            # nothing to guard (a variant that changes that gradient, LookSAM, counts in its hook)
            self._after_plain_pass(params, grads)
        self._reset_step()
        self._step += 1

    @staticmethod
    def _refuse_sparse(params: list[torch.Tensor]) -> None:
        if any(p.grad.is_sparse for p in params):
            raise ConfigurationError(
                "SAM cannot perturb along sparse gradients (e.g. nn.Embedding(sparse=True)); build the "
                "embedding with sparse=False, or leave its parameters out of the SAM optimizer."
            )

    @torch.no_grad()
    def advance(self) -> bool:
        """After the backward at the current perturbed point: move to the next one, if the variant has one.

        Returns False (nothing done, no cost) for every variant with one perturbed point, and after
        the last point of a multi-point variant. Otherwise it records whether the gradient just
        taken is finite (a non-finite one at any point makes the step fall back to the clean
        gradient, :meth:`unperturb`), restores ``w`` by copy and lets the variant keep what it needs
        of that gradient and move to its next point (:meth:`_next_point`); then returns True: zero
        the gradients in place and run the backward again at the new point.
        """
        if not self._perturbed or self._point + 1 >= self.perturbed_points:
            return False
        params = self._pass_params
        grads = self._grads_of(params)
        ok = F.all_finite(grads, groups=self.__dict__.get("_pass_groups"))
        self._points_ok = ok if self._points_ok is None else self._points_ok & ok
        if self._moved is not None:
            F.restore_(*self._moved)  # back to w by copy; the backup stays for the next restore
        self._point += 1
        self._next_point(params, grads, self._point)
        return True

    @torch.no_grad()
    def cancel(self) -> None:
        """Abandon the current step: restore ``w`` and running statistics by copy, keep the counters.

        Nothing from a perturbed pass reaches the variant's persistent state. :meth:`step` calls
        this when a closure raises; call it yourself when your own perturbed pass fails.
        """
        self._restore()
        self._reset_step()

    # ------------------------------------------------------------------------------ front ends
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """One SAM step: ``closure()`` at ``w``, again at ``w + e``, restore ``w``, base step.

        ``closure`` computes the loss and calls ``backward()``; it may zero the gradients itself
        (Lightning's does) or not: SAM zeroes them before the second call either way, so the clean
        gradient never leaks into the step. A multi-point variant calls it once more per extra
        point (GAM: four calls in all). Returns the closure's loss at ``w``, detached: its backward
        has run, so keeping it (logging, a running mean) keeps no graph alive, and a second
        ``backward()`` on it fails loudly (Lightning's own closure returns its loss detached too);
        a non-tensor result is returned as it is. If a closure raises,
        the weights and running statistics are restored before the exception propagates.
        """
        if closure is None:
            raise ConfigurationError(
                f"{type(self).__name__}.step() needs a closure that computes the loss and calls backward(); "
                "without one use first_step()/second_step() (or the GradScaler path in docs/optim.md)."
            )
        engine = SAMEngine(self)
        model = unwrap_data_parallel(self.model) if self.model is not None else None

        def replay() -> Any:
            with torch.enable_grad():
                return closure()

        try:
            engine.record(replay, model)
            no_sync = self._ddp.no_sync if self._ddp is not None else None
            with torch.enable_grad(), engine.clean_pass_context(no_sync, distributed=self._ddp is not None):
                loss = closure()
            if not self._params_with_grad():
                raise ConfigurationError(
                    f"{type(self).__name__}.step(closure): after the closure no parameter has a gradient; the closure "
                    "must compute the loss and call loss.backward() (and the loss must depend on the parameters)."
                )
        except BaseException:
            engine.abandon()
            raise
        engine.finish()
        self.base_optimizer.step()
        return loss.detach() if isinstance(loss, torch.Tensor) else loss

    def first_step(self, zero_grad: bool = False) -> bool:
        """Two-step form, after the clean backward: move to ``w + e``.

        Returns False when this step has no perturbed pass (LookSAM reuse, ``interval`` skips):
        then skip the second forward/backward and call :meth:`second_step` directly (the
        gradients are not zeroed in that case).
        """
        if self.perturbed_points > 1:
            raise ConfigurationError(
                f"{type(self).__name__} takes gradients at {self.perturbed_points} perturbed points per step, which "
                "first_step()/second_step() cannot express; use step(closure) or a framework adapter (Lightning, "
                "the Hugging Face Trainer, Accelerate)."
            )
        moved = self.perturb()
        if moved and zero_grad:
            self._zero_pass_grads()
        return moved

    def second_step(self, zero_grad: bool = False) -> None:
        """Two-step form, after the perturbed backward: restore ``w`` and take the base step."""
        self.unperturb()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    # ------------------------------------------------------------------------- variant hooks
    def _ascent(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(direction tensors, 0-dim scale) with ``e = scale * direction``; called before ``w`` moves.

        SAM: ``e = rho g / ||g||``. Adaptive (ASAM, Kwon et al. 2021, eq. 9 with p = 2):
        ``e = rho T^2 g / ||T g||`` with ``T = |w| + eta``. A zero or non-finite norm gives a zero
        scale (:func:`.functional.perturbation_scale`), never a division by zero.
        """
        groups = self.__dict__.get("_pass_groups")
        norm_fn = functools.partial(F.global_norm, groups=groups) if groups is not None else F.global_norm
        if self.adaptive:
            # In place, with no temporary: T = |w| + eta is formed in the weight backup (free until
            # _move fills it with w) and T g, then T^2 g, in ``grads`` -- the clean gradient (or a
            # variant's scratch), which the perturbed pass releases anyway; what a variant or the
            # fallback needs of it was copied before. The same operations as ascent_direction's.
            t = self._buffers("w", params)
            torch._foreach_copy_(t, params)
            torch._foreach_abs_(t)
            if self.eta:
                torch._foreach_add_(t, self.eta)
            torch._foreach_mul_(grads, t)
            norm = norm_fn(grads)
            torch._foreach_mul_(grads, t)
            directions = list(grads)
        else:
            directions, norm = F.ascent_direction(params, grads, norm=norm_fn)
        self._ascent_norm = norm  # finite iff the clean gradient is: perturb() reuses it
        return directions, F.perturbation_scale(norm, self.rho)

    def _after_perturbed_pass(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Hook: turn the perturbed gradient in ``grads`` into the one to step with (in place)."""

    def _after_plain_pass(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Hook: a step without a perturbed pass (``grads`` holds the clean gradient)."""

    def _next_point(self, params: list[torch.Tensor], grads: list[torch.Tensor], point: int) -> None:
        """Hook of a multi-point variant (``perturbed_points > 1``), called by :meth:`advance` with ``w``
        restored: keep what is needed of ``grads`` (the gradient at point ``point - 1``; they are
        zeroed next) and move ``params`` to point ``point`` (e.g. with :func:`.functional.add_scaled_`)."""
        raise NotImplementedError(f"{type(self).__name__} declares {self.perturbed_points} perturbed points but "
                                  "no _next_point")

    # ------------------------------------------------------------------------------- plumbing
    def _reset_step(self) -> None:
        self._prepared = False
        self._perturb_called = False
        self._perturbed = False
        self._point = 0  # the perturbed point whose gradient is being taken (advance() counts)
        self._points_ok: torch.Tensor | None = None  # finite gradients at the points before the last
        self._clean_ok: torch.Tensor | None = None
        self._pass_groups: F.Groups | None = None
        self._pass_params: list[torch.Tensor] = []
        self._moved: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._stats: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    @staticmethod
    def _grads_of(params: list[torch.Tensor]) -> list[torch.Tensor]:
        grads = [p.grad for p in params]
        if any(g is None for g in grads):  # a closure that set grads to None and never used p again
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
        return grads  # type: ignore[return-value]

    def _zero_pass_grads(self) -> None:
        # Released, as zero_grad() does (DDP puts its bucket views back at the next backward): the
        # variant copied what it needs, and the perturbed pass then peaks where a plain step does.
        for p in self._pass_params:
            p.grad = None

    def _groups_of(self, params: list[torch.Tensor]) -> F.Groups:
        """:func:`.functional.group_by_device_and_dtype` of ``params``, computed once per parameter list."""
        ids = list(map(id, params))
        cached = self.__dict__.get("_group_cache")
        if cached is not None and cached[1] == ids:
            return cached[2]
        self._refuse_sparse(params)  # a module makes sparse gradients or not: checked with the list
        groups = F.group_by_device_and_dtype(params)
        self._group_cache = (list(params), ids, groups)  # params referenced: their ids cannot be reused
        return groups

    def _buffers(self, name: str, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Scratch tensors shaped like ``like``, allocated once and reused while ``like`` is the same list."""
        ids = list(map(id, like))
        cached = self._scratch.get(name)
        if cached is not None and cached[1] == ids:
            return cached[2]
        buffers = [torch.empty_like(t, memory_format=torch.preserve_format) for t in like]
        # keep ``like`` referenced so that its ids cannot be reused by other tensors
        self._scratch[name] = (list(like), ids, buffers)
        return buffers

    def _state_list(self, name: str, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The persistent per-parameter buffer ``name`` of each param (zeros where missing)."""
        out = []
        for p in params:
            state = self.sam_state[p]
            if name not in state:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out.append(state[name])
        return out

    def _move(self, params: list[torch.Tensor], directions: list[torch.Tensor], scale: torch.Tensor) -> None:
        """Save ``w`` into a reused buffer (for :meth:`_restore`) and move to ``w + scale * directions``."""
        backup = self._buffers("w", params)
        torch._foreach_copy_(backup, params)
        self._moved = (params, backup)
        F.add_scaled_(params, directions, scale, groups=self.__dict__.get("_pass_groups"))

    def _snapshot_stats(self) -> None:
        if not self._stat_slots:
            return
        tensors = [getattr(module, name) for module, name in self._stat_slots]
        saved = self._buffers("stats", tensors)
        torch._foreach_copy_(saved, tensors)
        self._stats = (tensors, saved)

    def _restore(self) -> None:
        if self._moved is not None:
            F.restore_(*self._moved)
            self._moved = None
        if self._stats is not None:
            F.restore_(*self._stats)
            self._stats = None


#: the work of every variant's constructor (each class's ``__init__``, declared with its knobs, calls it)
_construct = SAM.__dict__["__init__"]
_declare_constructor(SAM)
registry.register(SAM)


class ASAM(SAM):
    r"""Adaptive SAM (Kwon et al., ICML 2021, arXiv:2102.11600): a scale-invariant neighbourhood.

    :math:`e = \rho\, T^2 g / \lVert T g \rVert_2` with :math:`T = \mathrm{diag}(|w| + \eta)`
    (eq. 9 with p = 2 and the paper's :math:`\eta`), applied to every parameter. The radius is
    relative to :math:`|w|`, so ``rho`` is about ten times SAM's (paper: 0.5 to 2.0).
    Cost: 2 forward/backward passes per step (``1 + 1/interval`` with ``interval``).
    """

    variant: ClassVar[str] = "asam"

    @classmethod
    def _configure(  # type: ignore[override]
        cls, *, rho: float = 0.5, eta: float = 0.01, interval: int = 1
    ) -> dict[str, Any]:
        return {"rho": _rho(rho), "eta": _non_negative("eta", eta), "interval": _positive_int("interval", interval),
                "adaptive": True}

