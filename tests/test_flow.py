"""Normalizing flow family: invertibility, log-determinants against autograd, ActNorm init,
the trainer interface (loss, bits/dim, sampling) and mixed precision. Tiny sizes, CPU."""

from __future__ import annotations

import pydantic
import pytest
import torch

from pipeline.errors import UserError
from pipeline.models.flow import (
    ActNorm,
    AffineCoupling,
    FlowConfig,
    FlowModel,
    InvertibleConv1x1,
    Squeeze,
    VariationalDequantizer,
)

TINY = dict(levels=2, depth=2, hidden_channels=16, dequant_depth=2, dequant_hidden_channels=8)
VARIANTS = [
    dict(architecture="glow", invertible_conv="lu"),
    dict(architecture="glow", invertible_conv="plain", learned_prior=False),
    dict(architecture="realnvp", dequantization="variational"),
]


def _perturb(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Move every parameter off its (often identity) initialisation so the checks mean something."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _batch(n: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=generator, dtype=torch.uint8)


def _layers():
    """(name, layer, input shape, context channels) for every layer type."""
    return [
        ("actnorm", ActNorm(4), (1, 4, 4, 4), 0),
        ("conv1x1_plain", InvertibleConv1x1(4, lu=False), (1, 4, 4, 4), 0),
        ("conv1x1_lu", InvertibleConv1x1(4, lu=True), (1, 4, 4, 4), 0),
        ("coupling_channel_sigmoid_0", AffineCoupling(4, 8, "channel", 0, "sigmoid"), (1, 4, 4, 4), 0),
        ("coupling_channel_tanh_1", AffineCoupling(5, 8, "channel", 1, "exp_tanh"), (1, 5, 4, 4), 0),
        ("coupling_checker_tanh_0", AffineCoupling(3, 8, "checkerboard", 0, "exp_tanh"), (1, 3, 4, 4), 0),
        ("coupling_checker_sigmoid_1", AffineCoupling(3, 8, "checkerboard", 1, "sigmoid"), (1, 3, 4, 4), 0),
        ("coupling_checker_context", AffineCoupling(3, 8, "checkerboard", 0, "exp_tanh", 2), (1, 3, 4, 4), 2),
        ("squeeze", Squeeze(), (1, 2, 4, 4), 0),
    ]


@pytest.mark.parametrize("index", range(len(_layers())), ids=[name for name, *_ in _layers()])
def test_layer_inverse_and_logdet_match_autograd(index):
    torch.manual_seed(0)
    _, layer, shape, context_channels = _layers()[index]
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64)
    if isinstance(layer, ActNorm):
        layer.train()
        layer(torch.randn(8, *shape[1:], dtype=torch.float64) * 2 + 1)  # data-dependent init
    layer.eval()
    _perturb(layer)
    context = torch.randn(1, context_channels, *shape[2:], dtype=torch.float64) if context_channels else None
    kwargs = {"context": context} if context is not None else {}

    y, logdet = layer(x, **kwargs)
    assert y.shape == torch.Size((1, *_output_shape(layer, shape)))
    x_back = layer.inverse(y, **kwargs)
    assert (x_back - x).norm() <= 1e-4 * x.norm()

    jacobian = torch.autograd.functional.jacobian(lambda t: layer(t, **kwargs)[0].flatten(), x)
    jacobian = jacobian.reshape(y.numel(), x.numel())
    expected = torch.linalg.slogdet(jacobian)[1]
    assert torch.allclose(logdet, expected.expand(1), atol=1e-8), (logdet, expected)


def _output_shape(layer, shape):
    if isinstance(layer, Squeeze):
        return (shape[1] * 4, shape[2] // 2, shape[3] // 2)
    return shape[1:]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_whole_flow_inverse_and_logdet(variant):
    torch.manual_seed(0)
    model = FlowModel(FlowConfig(**TINY, **variant), image_size=8, channels=3)
    model.train()
    model.loss(_batch(8))  # ActNorm data-dependent init
    model.eval()
    model.double()
    _perturb(model, 0.05)
    v = torch.rand(1, 3, 8, 8, dtype=torch.float64) - 0.5

    latents, logdet, log_prior = model.flow(v)
    assert torch.isfinite(log_prior).all()
    v_back = model.flow.inverse(latents=latents)
    assert (v_back - v).norm() <= 1e-4 * v.norm()

    # The whole map v -> (all latents), factored-out ones included, without the prior terms.
    jacobian = torch.autograd.functional.jacobian(
        lambda t: torch.cat([z.flatten(1) for z in model.flow(t)[0]], dim=1).flatten(), v
    ).reshape(v.numel(), v.numel())
    assert torch.allclose(logdet, torch.linalg.slogdet(jacobian)[1].expand(1), atol=1e-7)

    # Also invertible to 1e-4 in float32, the precision training runs in.
    model.float()
    v32 = v.float()
    v32_back = model.flow.inverse(latents=model.flow(v32)[0])
    assert (v32_back - v32).norm() <= 1e-4 * v32.norm()


def test_variational_dequantizer_log_q_matches_change_of_variables():
    torch.manual_seed(0)
    dequantizer = VariationalDequantizer(channels=2, depth=2, hidden_channels=8).double()
    _perturb(dequantizer)
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64) - 0.5
    noise = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    u, log_q = dequantizer(x, noise)
    assert ((u > 0) & (u < 1)).all()
    jacobian = torch.autograd.functional.jacobian(lambda e: dequantizer(x, e)[0].flatten(), noise)
    jacobian = jacobian.reshape(u.numel(), noise.numel())
    log_normal = (-0.5 * noise**2 - 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))).sum()
    assert torch.allclose(log_q, (log_normal - torch.linalg.slogdet(jacobian)[1]).expand(1), atol=1e-8)


def test_actnorm_init_normalises_first_batch_and_survives_state_dict():
    torch.manual_seed(0)
    layer = ActNorm(3).train()
    batch = torch.randn(16, 3, 5, 5) * torch.tensor([0.5, 2.0, 7.0]).view(1, 3, 1, 1) + 3.0
    y, _ = layer(batch)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    params = [p.clone() for p in layer.parameters()]
    layer(batch * 5 - 1)  # a second training batch does not re-initialise
    assert all(torch.equal(a, b) for a, b in zip(params, layer.parameters()))
    layer.load_state_dict(ActNorm(3).state_dict())  # loading an uninitialised state: init again
    y, _ = layer(batch * 5 - 1)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)

    model = FlowModel(FlowConfig(**TINY), image_size=8, channels=3).train()
    model.loss(_batch(8, seed=1))
    assert all(bool(m.initialized) for m in model.modules() if isinstance(m, ActNorm))
    resumed = FlowModel(FlowConfig(**TINY), image_size=8, channels=3)
    resumed.load_state_dict(model.state_dict())
    resumed.train()
    resumed.loss(_batch(8, seed=2))
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name

    fresh = FlowModel(FlowConfig(**TINY), image_size=8, channels=3).eval()
    fresh.loss(_batch(8))  # eval mode never initialises
    assert not any(bool(m.initialized) for m in fresh.modules() if isinstance(m, ActNorm))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_training_reduces_bits_per_dim_and_sampling(variant):
    torch.manual_seed(0)
    model = FlowModel(FlowConfig(**TINY, **variant), image_size=8, channels=3)
    assert model.bits_per_dim_kind == "upper_bound"
    batch = _batch(8)
    model.train()
    loss, metrics = model.loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

    def evaluate():
        model.eval()
        torch.manual_seed(123)  # the same dequantisation noise each time
        bpd = model.bits_per_dim(batch)
        model.train()
        return bpd

    before = evaluate()
    assert before.shape == (8,) and torch.isfinite(before).all()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(12):
        optimizer.zero_grad()
        model.loss(batch)[0].backward()
        optimizer.step()
    after = evaluate()
    assert after.mean() < before.mean() - 0.05, (before.mean(), after.mean())

    model.eval()
    samples = model.sample(5, torch.Generator().manual_seed(7))
    assert samples.shape == (5, 3, 8, 8) and samples.dtype == torch.uint8
    assert torch.equal(samples, model.sample(5, torch.Generator().manual_seed(7)))
    assert not torch.equal(samples, model.sample(5, torch.Generator().manual_seed(8)))
    assert model.sample(2, torch.Generator().manual_seed(7), temperature=1.0).shape == (2, 3, 8, 8)


def test_autocast_bfloat16():
    torch.manual_seed(0)
    model = FlowModel(FlowConfig(**TINY, dequantization="variational"), image_size=8, channels=3).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = model.loss(_batch(4))
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        model.eval()
        assert torch.isfinite(model.bits_per_dim(_batch(4))).all()
        assert model.sample(2, torch.Generator().manual_seed(0)).dtype == torch.uint8
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_config_errors():
    with pytest.raises(UserError, match="model.levels"):
        FlowModel(FlowConfig(levels=4), image_size=8, channels=3)
    with pytest.raises(pydantic.ValidationError):
        FlowConfig(levels=0)
    with pytest.raises(pydantic.ValidationError):
        FlowConfig(dequantisation="uniform")  # misspelt key
    with pytest.raises(pydantic.ValidationError):
        FlowConfig(temperature=0)
    model = FlowModel(FlowConfig(**TINY, architecture="realnvp"), image_size=8, channels=1)
    assert model.sample(1, torch.Generator().manual_seed(0)).shape == (1, 1, 8, 8)
    with pytest.raises(UserError, match="sampling options"):
        model.sample(1, torch.Generator(), steps=3)
