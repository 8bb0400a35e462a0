"""The Opacus engine's client runtime, inside Lightning's batch loop (``engine=opacus``).

Lightning trains one module; the strategy serves a round's batches client after client. At a client's first batch
:meth:`OpacusRuntime.begin` switches the DP optimizer to that client's noise stream, clip and accountant; after its
last step :meth:`OpacusRuntime.end` hands the server the client's one :class:`~fl_dp_lightning.update.ClientUpdate`.
Under DP nothing else computed from its records leaves: raw gradients are dropped as soon as backward produces
them (Opacus works from per-example gradients), per-example gradients are cleared after every step, and training
metrics are kept only where the privacy rules release them.
"""

from __future__ import annotations

import copy
import functools
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn
from torch.optim import Optimizer

from fl_dp_lightning.config import ConfigError, PrivacyConfig
from fl_dp_lightning.privacy.layers import fixes_for, unsupported_layers
from fl_dp_lightning.privacy.per_example import ContiguousGradSampleModule
from fl_dp_lightning.privacy.probe import check_sensitivity
from fl_dp_lightning.runtime.client import ClientState
from fl_dp_lightning.runtime.sampling import call_training_step
from fl_dp_lightning.update import ClientUpdate


@functools.cache
def dp_optimizer_named(name: str) -> type[DPOptimizer]:
    """Opacus's ``DPOptimizer`` under the user's optimizer's class name, by which LearningRateMonitor names its
    curves (``lr-Adam``, not ``lr-DPOptimizer``)."""
    return type(name, (DPOptimizer,), {"__doc__": DPOptimizer.__doc__, "__module__": DPOptimizer.__module__})


class OpacusRuntime:
    """One client at a time through the user's ``training_step``, with Opacus's per-sample gradients and
    ``DPOptimizer`` (or, without record-level DP, the plain optimizer)."""

    def __init__(self, privacy: PrivacyConfig, release_metrics: bool):
        self.privacy = privacy
        self.release_metrics = release_metrics
        self.optimizer: DPOptimizer | None = None
        """The DP optimizer (``None`` without record-level DP)."""
        self.client: ClientState | None = None
        """The client whose batches train now."""
        self.failure: str | None = None
        """Why the current client's round failed (released form), or ``None``."""
        self._grad_sample_module: ContiguousGradSampleModule | None = None
        self._grad_hooks: list[Any] = []
        self._probing = False
        self._started = 0.0
        self._metric_sums: dict[str, Tensor] = {}
        self._metric_steps = 0
        self._steps = 0
        self._schedule: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])

    def make_private(self, module: nn.Module, optimizer: Optimizer) -> DPOptimizer:
        """Wraps ``module`` for per-sample gradients and ``optimizer`` for clipping and noise; refuses layers
        DP-SGD cannot train."""
        unsupported = unsupported_layers(module)
        if unsupported:
            raise ConfigError(
                f"{type(module).__name__} has layers DP-SGD cannot train: {unsupported} Fix: set "
                "privacy.fix_modules=true (PrivacyConfig(fix_modules=True)) to replace them in place "
                f"({fixes_for(module)}), or replace them in your module."
            )
        # torch warns whenever a first layer's input needs no gradient, which is every batch here: Opacus's hooks
        # need only the layer's output gradients
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        # Hooks go on the module's own layers; Lightning keeps calling the LightningModule itself.
        self._grad_sample_module = ContiguousGradSampleModule(
            module, batch_first=True, loss_reduction=self.privacy.loss_reduction, strict=True
        )
        self.optimizer = dp_optimizer_named(type(optimizer).__name__)(
            optimizer,
            noise_multiplier=self.privacy.noise_multiplier,
            max_grad_norm=self.privacy.max_grad_norm,
            expected_batch_size=1,  # set per client in begin
            loss_reduction=self.privacy.loss_reduction,
            secure_mode=self.privacy.secure_mode,
        )
        # the summed, unclipped gradient must not outlive backward (Opacus uses the per-example ones), unless the
        # privacy rules release training outputs (privacy.unsafe_release_training_metrics)
        self._grad_hooks = [
            p.register_post_accumulate_grad_hook(self._drop_grad)
            for p in module.parameters()
            if p.requires_grad and not self.release_metrics
        ]
        return self.optimizer

    def _drop_grad(self, param: Tensor) -> None:
        if not self._probing:  # the probe compares the module's own gradient with the per-example ones
            param.grad = None

    def probe(self, module: Any, batches: Callable[[int], Any], sizes: list[int]) -> None:
        """Refuses, before any step, modules whose per-example gradients would not bound a record's influence
        (see :func:`~fl_dp_lightning.privacy.probe.check_sensitivity`)."""
        self._probing = True
        try:
            check_sensitivity(
                module,
                lambda batch: call_training_step(module, batch),
                batches,
                sizes=sizes,
                loss_reduction=self.privacy.loss_reduction,
            )
        except RuntimeError as err:
            if "BackwardHookFunction" not in str(err):
                raise
            raise ConfigError(
                "the module's forward modifies a layer's output in place (for example torchvision ResNet's "
                "`out += identity`), which Opacus's per-sample-gradient hooks cannot follow; nothing was trained. "
                "Fix: privacy.fix_modules=true makes torchvision's ResNet blocks add out of place; elsewhere write "
                "it out of place (`out = out + identity`)."
            ) from err
        finally:
            self._probing = False

    def start_round(self, optimizer: Optimizer, schedulers: Sequence[Any]) -> None:
        """Keeps the optimizer's hyperparameters (learning rate, momentum, ...) and every LR scheduler's state at
        the round's start, where each of the round's clients begins."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self._schedule = groups, [copy.deepcopy(c.scheduler.state_dict()) for c in schedulers]

    def begin(
        self, client: ClientState, optimizer: Optimizer, schedulers: Sequence[Any], after_noise: Callable[[], None]
    ) -> None:
        """Starts ``client``'s round: a fresh optimizer at the round's point of the LR schedule, and its noise
        stream, clip, expected batch and accountant; ``after_noise`` runs after clipping and noise, before each
        update (FedProx's term: it costs no privacy)."""
        optimizer.state.clear()  # a client starts a round with a fresh optimizer, as in FedAvg
        # per-step schedulers would otherwise run on across the round's clients in sequence (the schedule continues
        # from where the round's last client leaves it)
        groups, states = self._schedule
        for group, saved in zip(optimizer.param_groups, groups):
            group.update(saved)
        for config, saved in zip(schedulers, states):
            config.scheduler.load_state_dict(copy.deepcopy(saved))  # the scheduler adopts the dict's objects
        if self.optimizer is not None:
            self.optimizer.noise_multiplier = client.noise_multiplier
            self.optimizer.max_grad_norm = client.max_grad_norm
            self.optimizer.expected_batch_size = client.batch_size
            self.optimizer.generator = client.noise_rng
            account = client.accountant.get_optimizer_hook_fn(sample_rate=client.sample_rate)

            def step_hook(optimizer: DPOptimizer) -> None:
                account(optimizer)
                after_noise()

            self.optimizer.attach_step_hook(step_hook)
        self.client, self.failure = client, None
        self._started = time.monotonic()
        self._metric_sums, self._metric_steps, self._steps = {}, 0, 0

    @property
    def failed(self) -> bool:
        """Whether the current client's round failed (its remaining batches are skipped)."""
        return self.failure is not None

    def elapsed(self) -> float:
        """Seconds since the current client began."""
        return time.monotonic() - self._started

    def record_metrics(self, output: Any) -> None:
        """Adds a step's scalar outputs (``loss``, ...) to the client's means, where they may be released."""
        if not self.release_metrics:
            return
        scalars = {"loss": output} if isinstance(output, Tensor) else output if isinstance(output, dict) else {}
        for key, value in scalars.items():
            if isinstance(value, Tensor) and value.numel() == 1:
                value = value.detach().float().reshape(())
                self._metric_sums[key] = self._metric_sums[key] + value if key in self._metric_sums else value
        self._metric_steps += 1

    def empty_backward(self) -> None:
        """An empty batch (Poisson sampling drew no record, or the client failed): zero per-sample gradients, so
        clipping sums nothing and the noise is still added and accounted."""
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)

    def after_backward(self, params: Mapping[str, Tensor], records: int) -> None:
        """Per-example gradients in float32 under mixed precision: clipping needs their norms exact. An audit's
        sampled Dirac canaries join the batch's ``records``: under DP as per-example gradients, which Opacus
        clips, noises and accounts as any record's; without DP in the batch's gradient, as the loss reduces."""
        for p in self.optimizer.params if self.optimizer is not None else ():
            if isinstance(p.grad_sample, Tensor) and p.grad_sample.dtype in (torch.float16, torch.bfloat16):
                p.grad_sample = p.grad_sample.float()
        canaries = self.client.canaries if self.client is not None else None
        if canaries is None:
            return
        included = canaries.sample(self.client.sample_rate)
        trained = {name: params[name] for name in canaries.shapes}
        if self.optimizer is not None:
            rows = canaries.per_example(included, trained)
            for name, p in trained.items():
                p.grad_sample = torch.cat([p.grad_sample, rows[name]])
            return
        scale = 1 / max(records, 1) if self.privacy.loss_reduction == "mean" else 1.0
        for name, grad in canaries.summed(included, trained).items():
            p = trained[name]
            p.grad = grad * scale if p.grad is None else p.grad + grad * scale

    def after_step(self, stepped: bool) -> None:
        """After each optimizer step: per-example gradients reach neither memory nor checkpoints."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if stepped and self.client is not None:
            self.client.steps_taken += 1
            self._steps += 1

    def end(self, round_no: int, state: Mapping[str, Tensor]) -> ClientUpdate:
        """The client's one update: its trained weights, or, when it failed, why."""
        client, self.client = self.client, None
        if self.failure is not None:
            return ClientUpdate(client.name, round_no, None, client.num_examples, self._steps, failure=self.failure)
        steps = self._metric_steps
        metrics = {k: float(v) / steps for k, v in self._metric_sums.items()} if steps else {}
        return ClientUpdate(client.name, round_no, dict(state), client.num_examples, self._steps, metrics)

    def close(self) -> None:
        """Removes Opacus's hooks and the gradient guards: the user's module comes back clean."""
        if self._grad_sample_module is not None:
            self._grad_sample_module._close()
            self._grad_sample_module = None
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []
