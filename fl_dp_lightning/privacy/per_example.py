"""Per-example gradients from each layer's input and output gradient, by Opacus's per-layer rules.

One forward of the whole batch and one backward to the layers' outputs; each layer's rule (Opacus's grad
samplers, ``GradSampleModule.GRAD_SAMPLERS``) turns the layer's input and output gradient into one gradient per
example, as Opacus's hooks do, but without hooks left on the module and without its per-step bookkeeping. On CPU
cores this is about twice as fast as ``vmap`` over examples for the seed CNN (benchmarks/speed.py), most of it
from running convolutions and pooling in the channels-last layout (:func:`loaded`).

It gives exactly what ``vmap(grad(loss))`` gives only when every trained parameter belongs to one layer with a
rule and each such layer runs once per forward; :func:`layer_rules` and :func:`per_example_gradients` check both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from opacus import GradSampleModule
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerRules:
    """The layers that hold the trained parameters, each with Opacus's rule, and those parameters by name."""

    layers: tuple[nn.Module, ...]
    parameters: dict[str, nn.Parameter]
    names: dict[int, str] = field(init=False)
    """``id(parameter)`` -> its name in the module (Opacus's rules key their results by parameter)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", {id(p): name for name, p in self.parameters.items()})


def layer_rules(module: nn.Module, trained: Sequence[str]) -> LayerRules | str:
    """The layers holding ``trained`` parameters, or why Opacus's per-layer rules cannot give their gradients (a
    trained parameter held by a layer without a rule, or shared between layers)."""
    wanted = set(trained)
    parameters: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    layers = []
    for prefix, layer in module.named_modules(remove_duplicate=False):
        own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in layer.named_parameters(recurse=False)]
        own = [(name, p) for name, p in own if p.requires_grad]
        if not own:
            continue
        if type(layer) not in GradSampleModule.GRAD_SAMPLERS:
            return f"{type(layer).__name__} ({prefix or 'the module itself'}) has no per-example rule in Opacus"
        if any(id(p) in seen for _, p in own):
            return f"{type(layer).__name__} ({prefix}) shares a parameter with another layer"
        seen.update(id(p) for _, p in own)
        parameters.update((name, p) for name, p in own if name in wanted)
        layers.append(layer)
    missing = wanted - set(parameters)
    if missing:
        return f"trained parameters {sorted(missing)} are not a layer's own"
    return LayerRules(tuple(layers), parameters)


def channels_last(tensor: Tensor) -> Tensor:
    """A 4-D tensor in the channels-last layout (others as they are), with channels-last strides even when it has
    one channel: there torch keeps the contiguous strides, and a convolution then picks the slower layout."""
    if tensor.dim() != 4:
        return tensor
    tensor = tensor.contiguous(memory_format=torch.channels_last)
    if tensor.shape[1] == 1:
        height, width = tensor.shape[2:]
        tensor = tensor.as_strided(tensor.shape, (height * width, 1, width, 1))
    return tensor


@contextmanager
def loaded(own: Mapping[str, nn.Parameter], params: Mapping[str, Tensor], layout_channels_last: bool) -> Iterator[None]:
    """The parameters ``own`` (a module's, by name) holding the values ``params`` (4-D ones channels-last when asked:
    the layout in which CPU convolutions and pooling run fastest); their own values come back on exit."""
    kept = {name: own[name].data for name in params}
    try:
        for name, value in params.items():
            own[name].data = channels_last(value) if layout_channels_last else value
        yield
    finally:
        for name, value in kept.items():
            own[name].data = value


def per_example_gradients(
    rules: LayerRules, module: nn.Module, x: Tensor, y: Tensor, loss: Callable[[Tensor, Tensor], Tensor]
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Each example's gradient of its own loss, by parameter name (``[n, *shape]``), with the examples' losses
    and the module's output (both detached).

    Raises:
        RuntimeError: a layer with trained parameters ran more than once in the forward (its rule would see only
            one of its inputs).
    """
    inputs: dict[nn.Module, list] = {}
    outputs: dict[nn.Module, Tensor] = {}
    calls = dict.fromkeys(rules.layers, 0)

    def capture(layer: nn.Module, args: tuple, output: Tensor) -> None:
        inputs[layer] = rule_inputs([a.detach() if isinstance(a, Tensor) else a for a in args])
        outputs[layer] = output
        calls[layer] += 1

    handles = [layer.register_forward_hook(capture) for layer in rules.layers]
    try:
        with torch.enable_grad():
            output = module(x)
            losses = loss(output, y)
            repeated = [type(layer).__name__ for layer, count in calls.items() if count != 1]
            if repeated:
                raise RuntimeError(f"layers {repeated} ran {sorted(set(calls.values()))} times in one forward")
            backprops = torch.autograd.grad(losses.sum(), [outputs[layer] for layer in rules.layers], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    grads = {}
    for layer, backprop in zip(rules.layers, backprops):
        if backprop is None:  # the layer does not reach the loss
            backprop = torch.zeros_like(outputs[layer])
        for param, gradient in GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, inputs[layer], backprop).items():
            if id(param) in rules.names:
                grads[rules.names[id(param)]] = gradient
    return grads, losses.detach(), output.detach()


class ContiguousGradSampleModule(GradSampleModule):
    """Opacus's ``GradSampleModule`` that hands its per-layer rules each layer's input in the contiguous layout.

    Opacus's convolution rule indexes its input by strides that assume that layout: with a channels-last input (a
    module moved with ``.to(memory_format=torch.channels_last)``, or channels-last data) it computes wrong
    per-example gradients, and so clips the wrong thing.
    """

    def capture_activations_hook(self, module: nn.Module, forward_input: list, _forward_output: Tensor) -> None:
        super().capture_activations_hook(module, rule_inputs(forward_input), _forward_output)


def rule_inputs(args: Sequence) -> list:
    """A layer's inputs as Opacus's per-layer rules need them: its convolution rule indexes its input by strides
    that assume the contiguous layout, and misreads a channels-last one."""
    return [a.contiguous() if isinstance(a, Tensor) else a for a in args]
