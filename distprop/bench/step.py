"""`distprop bench step`: one training step of distprop against the same model in
PyTorch, in the same process, at the same thread count, on the same data and weights.

A step is zero_grad, forward, cross-entropy, backward and an SGD-with-momentum
update. The figures are medians over interleaved rounds; the ratio is distprop's
time over PyTorch's (below 1 means distprop is faster).
"""

from __future__ import annotations

import os

import numpy as np

from distprop.bench.timing import environment_note, interleaved, measure, median

# name: (batch, input shape, target ratio of distprop's time over PyTorch's)
MODELS = {
    "mlp": (256, (784,), 0.9),
    "cnn": (128, (1, 28, 28), 1.0),
    "resnet": (128, (3, 32, 32), 1.0),
}


def configure(parser) -> None:
    parser.add_argument("--models", default="mlp,cnn,resnet", help="comma-separated: mlp, cnn, resnet")
    parser.add_argument("--threads", default=None,
                        help="comma-separated thread counts (default: 1 and all cores)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")


def build(name: str, device: str):
    """distprop's model and its PyTorch twin holding the same weights."""
    import distprop as dp
    from distprop.bench import torch_models
    from distprop.nn.models import LeNet, MLP, resnet_small

    dp.manual_seed(0)
    if name == "mlp":
        ours = MLP(784, [1024, 1024], 10)
        twin = torch_models.mlp(784, [1024, 1024], 10)
    elif name == "cnn":
        ours = LeNet(num_classes=10, in_channels=1, input_size=28)
        twin = torch_models.LeNet(ours)
    elif name == "resnet":
        ours = resnet_small(num_classes=10)
        twin = torch_models.ResNet(ours)
    else:
        raise ValueError(f"unknown model {name!r}")
    torch_models.load_weights(twin, ours)
    if device == "gpu":
        ours.to(device="gpu")
        twin.cuda()
    return ours, twin


def step_functions(name: str, device: str):
    import torch

    import distprop as dp
    import distprop.functional as F
    from distprop import backend, optim

    batch, shape, _ = MODELS[name]
    ours, twin = build(name, device)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + shape).astype(np.float32)
    y = rng.integers(0, 10, batch)
    x_ours, y_ours = backend.to_device(x, device), backend.to_device(y, device)
    x_twin, y_twin = torch.from_numpy(x), torch.from_numpy(y)
    if device == "gpu":
        x_twin, y_twin = x_twin.cuda(), y_twin.cuda()
    opt = optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)

    def ours_step():
        opt.zero_grad()
        F.cross_entropy(ours(dp.tensor(x_ours)), y_ours).backward()
        opt.step()
        if device == "gpu":
            backend.synchronize()

    def twin_step():
        twin_opt.zero_grad()
        torch.nn.functional.cross_entropy(twin(x_twin), y_twin).backward()
        twin_opt.step()
        if device == "gpu":
            torch.cuda.synchronize()

    return ours_step, twin_step, ours


def optimizer_updates(name: str, device: str):
    """``{optimizer: (ours, torch's)}``: one update of the model's parameters from fixed
    gradients, SGD with momentum and Adam, without the forward and backward."""
    import torch

    from distprop import backend, optim

    ours, twin = build(name, device)
    rng = np.random.default_rng(0)
    params, twin_params = list(ours.parameters()), list(twin.parameters())
    for param, twin_param in zip(params, twin_params):
        grad = rng.standard_normal(param.shape).astype(np.float32)
        param.grad = backend.to_device(grad, device)
        twin_param.grad = torch.from_numpy(grad).to(twin_param.device)
    pairs = {"SGD momentum": (optim.SGD(params, lr=0.01, momentum=0.9),
                              torch.optim.SGD(twin_params, lr=0.01, momentum=0.9)),
             "Adam": (optim.Adam(params, lr=1e-3), torch.optim.Adam(twin_params, lr=1e-3))}

    def timed(step, synchronize):
        def update():
            step()
            synchronize()
        return update

    ours_sync = backend.synchronize if device == "gpu" else (lambda: None)
    twin_sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
    return {label: (timed(a.step, ours_sync), timed(b.step, twin_sync)) for label, (a, b) in pairs.items()}


def mlp_step_flops(model, batch: int) -> float:
    """Matrix-multiply FLOPs of one MLP step: 2*B*in*out per Linear forward, the same
    for each weight gradient, and for each input gradient but the first layer's."""
    from distprop.nn import Linear

    linears = [m for m in model.modules() if isinstance(m, Linear)]
    flops = 0.0
    for i, layer in enumerate(linears):
        out_features, in_features = layer.weight.shape
        products = 3 if i > 0 else 2
        flops += products * 2.0 * batch * in_features * out_features
    return flops


def sgemm_flops_per_second(device: str) -> float:
    from distprop import backend

    xp = backend.cupy_module() if device == "gpu" else np
    a = xp.ones((2048, 2048), np.float32)

    def product():
        a @ a
        if device == "gpu":
            backend.synchronize()

    return 2.0 * 2048 ** 3 / median(measure(product, repeats=10, warmup=2))


def run(args) -> int:
    import torch
    from threadpoolctl import threadpool_limits

    cores = os.cpu_count() or 1
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    print(environment_note())
    print(f"torch {torch.__version__}, device {args.device}, medians of {args.rounds} interleaved rounds")
    print(f"{'model':8} {'batch':>5} {'threads':>7} {'distprop ms':>12} {'torch ms':>9} {'ratio':>6} {'target':>7}")
    for threads in thread_counts:
        torch.set_num_threads(threads)
        with threadpool_limits(limits=threads):
            gemm = sgemm_flops_per_second(args.device)
            for name in names:
                ours_step, twin_step, model = step_functions(name, args.device)
                times = interleaved({"ours": ours_step, "torch": twin_step}, rounds=args.rounds)
                batch, _, target = MODELS[name]
                ratio = times["ours"] / times["torch"]
                print(f"{name:8} {batch:5d} {threads:7d} {times['ours'] * 1e3:12.2f} "
                      f"{times['torch'] * 1e3:9.2f} {ratio:6.3f} {'<= ' + str(target):>7}")
                if name == "mlp":
                    achieved = mlp_step_flops(model, batch) / times["ours"]
                    print(f"{'':8} sgemm {gemm / 1e9:.0f} GFLOP/s measured; the MLP step reaches "
                          f"{achieved / 1e9:.0f} GFLOP/s = {achieved / gemm:.0%} of it")
                    for label, (ours_update, twin_update) in optimizer_updates(name, args.device).items():
                        update = interleaved({"ours": ours_update, "torch": twin_update}, rounds=args.rounds)
                        print(f"{'':8} {label} update alone: {update['ours'] * 1e3:.2f} ms, torch "
                              f"{update['torch'] * 1e3:.2f} ms ({update['ours'] / update['torch']:.2f}x)")
    return 0
