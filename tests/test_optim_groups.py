"""Parameter groups: per-group hyperparameters and learning rates, as PyTorch's optimizers take
them; the rates are inputs of the compiled step (changing them never recompiles), and the data-
parallel step, checkpoints and exported steps keep them per group."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import GraphcError, nn, optim
from graphc.distributed import DataParallelStep, World
from graphc.train import load_checkpoint, save_checkpoint

rng = np.random.default_rng(0)
X = rng.standard_normal((8, 3)).astype(np.float32)
Y = rng.standard_normal((8, 2)).astype(np.float32)
STEPS = 4

# (optimizer, defaults, group 0 = weight, group 1 = bias): groups differ in lr and more
CASES = [
    ("SGD", {"lr": 0.1}, {"momentum": 0.9, "weight_decay": 0.01}, {"lr": 0.3}),
    ("Adam", {"lr": 0.01}, {"betas": (0.8, 0.99)}, {"lr": 0.05, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.01}, {"weight_decay": 0.1}, {"weight_decay": 0.0, "lr": 0.03}),
    # PyTorch's Adagrad reads initial_accumulator_value from its defaults only: set it there
    ("Adagrad", {"lr": 0.1, "initial_accumulator_value": 0.1}, {"eps": 1e-6}, {"lr_decay": 0.01}),
    ("RMSprop", {"lr": 0.01}, {"momentum": 0.9, "centered": True}, {"alpha": 0.9, "lr": 0.02}),
]
IDS = [c[0] for c in CASES]


def grouped(name, defaults, first, second, params):
    weight, bias = params
    return getattr(optim, name)([{"params": [weight], **first}, {"params": [bias], **second}],
                                **defaults)


def graphc_run(name, defaults, first, second, backend="reference", rates=None):
    """Weights after each step, with `rates[t]` = (lr0, lr1) set before step t when given."""
    gc.manual_seed(0)
    model = nn.Linear(3, 2)
    start = {k: v.copy() for k, v in model.state_dict().items()}
    opt = grouped(name, defaults, first, second, [model.weight, model.bias])
    step = gc.compile_train_step(model, F.mse_loss, opt, (X, Y), backend=backend)
    history = []
    for t in range(STEPS):
        if rates is not None:
            for group, lr in zip(opt.param_groups, rates[t]):
                group["lr"] = lr
        step(X, Y)
        history.append({k: v.copy() for k, v in model.state_dict().items()})
    return start, history, step


def torch_run(name, defaults, first, second, start, rates=None):
    torch = pytest.importorskip("torch")
    weight = torch.tensor(start["weight"], requires_grad=True)
    bias = torch.tensor(start["bias"], requires_grad=True)
    opt = getattr(torch.optim, name)([{"params": [weight], **first}, {"params": [bias], **second}],
                                     **defaults)
    history = []
    for t in range(STEPS):
        if rates is not None:
            for group, lr in zip(opt.param_groups, rates[t]):
                group["lr"] = lr
        opt.zero_grad()
        torch.nn.functional.mse_loss(torch.tensor(X) @ weight.T + bias, torch.tensor(Y)).backward()
        opt.step()
        history.append({"weight": weight.detach().numpy().copy(), "bias": bias.detach().numpy().copy()})
    return history, opt


def assert_same(ours, theirs):
    for t, (a, b) in enumerate(zip(ours, theirs)):
        for key in ("weight", "bias"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=2e-6, err_msg=f"step {t + 1} {key}")


@pytest.mark.parametrize("name,defaults,first,second", CASES, ids=IDS)
def test_groups_match_pytorch(name, defaults, first, second):
    start, ours, _ = graphc_run(name, defaults, first, second)
    theirs, _ = torch_run(name, defaults, first, second, start)
    assert_same(ours, theirs)


def test_param_groups_are_dicts_like_pytorchs():
    torch = pytest.importorskip("torch")
    model = nn.Linear(3, 2)
    name, defaults, first, second = CASES[2]
    ours = grouped(name, defaults, first, second, [model.weight, model.bias]).param_groups
    tw, tb = torch.zeros(2, 3, requires_grad=True), torch.zeros(2, requires_grad=True)
    theirs = torch.optim.AdamW([{"params": [tw], **first}, {"params": [tb], **second}],
                               **defaults).param_groups
    assert len(ours) == 2 and ours[0]["params"][0] is model.weight
    for group, torch_group in zip(ours, theirs):
        for key, value in group.items():
            if key != "params":
                assert torch_group[key] == value, key


def test_changing_a_groups_rate_between_steps_never_recompiles():
    rates = [(0.1, 0.3), (0.05, 0.3), (0.05, 0.0), (0.2, 0.01)]
    name, defaults, first, second = CASES[0]
    start, ours, step = graphc_run(name, defaults, first, second, rates=rates)
    theirs, _ = torch_run(name, defaults, first, second, start, rates=rates)
    assert_same(ours, theirs)
    assert len(step._compiled) == 1
    assert [i.name for i in step.graph.inputs if i.name.startswith("lr")] == ["lr.0", "lr.1"]


def test_groups_on_numba_cpu_equal_the_reference():
    name, defaults, first, second = CASES[2]
    rates = [(0.01, 0.03), (0.02, 0.0), (0.005, 0.1), (0.01, 0.03)]
    _, reference, _ = graphc_run(name, defaults, first, second, rates=rates)
    _, compiled, step = graphc_run(name, defaults, first, second, "numba-cpu", rates=rates)
    assert_same(compiled, reference)
    assert len(step._compiled) == 1


def test_one_rate_for_all_groups_or_a_clear_error():
    model = nn.Linear(3, 2)
    opt = optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}], lr=0.1)
    with pytest.raises(GraphcError, match=r"different learning rates.*param_groups\[i\]\['lr'\]"):
        opt.lr
    opt.lr = 0.2
    assert opt.lr == 0.2 and [g["lr"] for g in opt.param_groups] == [0.2, 0.2]


def test_a_parameter_in_two_groups_is_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(GraphcError, match=r"shape \(2, 3\) appears in parameter group 1 and in group 0"):
        optim.Adam([{"params": [model.weight]}, {"params": [model.weight, model.bias]}])
    with pytest.raises(GraphcError, match=r"shape \(2, 3\) appears twice in parameter group 0"):
        optim.Adam([model.weight, model.weight])


def test_unknown_group_keys_and_malformed_groups_are_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(GraphcError, match=r"unknown key\(s\) \['momentum'\] in parameter group 1; "
                                          "AdamW takes amsgrad, betas, eps, lr, maximize, weight_decay"):
        optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "momentum": 0.9}])
    with pytest.raises(GraphcError, match="group 0 has no parameters"):
        optim.SGD([{"params": []}], lr=0.1)
    with pytest.raises(GraphcError, match="dict with a 'params' key"):
        optim.SGD([{"params": [model.weight]}, {"lr": 0.1}], lr=0.1)
    with pytest.raises(ValueError, match="group 1: Nesterov"):
        optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "nesterov": True}], lr=0.1,
                  momentum=0.0)


def test_a_compiled_in_hyperparameter_changed_after_compiling_is_refused():
    model = nn.Linear(3, 2)
    opt = optim.AdamW([{"params": [model.weight], "weight_decay": 0.1},
                       {"params": [model.bias], "weight_decay": 0.0}], lr=0.01)
    step = gc.compile_train_step(model, F.mse_loss, opt, (X, Y), backend="reference")
    step(X, Y)
    opt.param_groups[0]["weight_decay"] = 0.2
    with pytest.raises(GraphcError, match=r"param_groups\[0\]\['weight_decay'\] changed from 0.1 "
                                          r"to 0.2 .*only 'lr' is an input"):
        step(X, Y)
    opt.param_groups[0]["weight_decay"] = 0.1
    step(X, Y)
    assert float(step.step_count) == 2


def test_a_group_added_after_compiling_is_refused():
    model, other = nn.Linear(3, 2), nn.Linear(2, 2)
    opt = optim.SGD([model.weight], lr=0.1)
    step = gc.compile_train_step(model, F.mse_loss, opt, (X, Y), backend="reference")
    opt.add_param_group({"params": [model.bias], "lr": 0.01})
    with pytest.raises(GraphcError, match="parameter groups changed after the step was compiled"):
        step(X, Y)
    with pytest.raises(GraphcError, match="not one of its parameters"):
        opt.init_state(other.weight)


def test_a_world_of_one_steps_groups_as_the_single_process_step():
    name, defaults, first, second = CASES[1]
    results = []
    for build in (gc.compile_train_step, lambda *a, **k: DataParallelStep(*a, **k, world=World())):
        gc.manual_seed(0)
        model = nn.Linear(3, 2)
        opt = grouped(name, defaults, first, second, [model.weight, model.bias])
        step = build(model, F.mse_loss, opt, (X, Y), backend="reference")
        for lr1 in (0.05, 0.01, 0.2):
            opt.param_groups[1]["lr"] = lr1
            step(X, Y)
        results.append(model.state_dict())
    for key in ("weight", "bias"):
        np.testing.assert_array_equal(results[0][key], results[1][key])


def test_checkpoints_hold_each_groups_state(tmp_path):
    """SGD with momentum in one group only: that group's parameters alone have a buffer."""
    def build():
        gc.manual_seed(0)
        model = nn.Linear(3, 2)
        opt = optim.SGD([{"params": [model.weight], "momentum": 0.9},
                         {"params": [model.bias]}], lr=0.1)
        return model, gc.compile_train_step(model, F.mse_loss, opt, (X, Y), backend="reference")

    model, step = build()
    assert {n: sorted(s) for n, s in step.opt_state.items()} == {"weight": ["momentum_buffer"], "bias": []}
    step(X, Y)
    save_checkpoint(str(tmp_path / "ckpt.safetensors"), step)
    step(X, Y)
    model2, step2 = build()
    load_checkpoint(str(tmp_path / "ckpt.safetensors"), step2)
    step2(X, Y)
    np.testing.assert_array_equal(model2.weight, model.weight)


def test_a_group_taken_out_and_put_back_counts_its_own_steps_as_pytorch(tmp_path):
    """Freezing a layer by taking its group out of Adam, then putting it back: PyTorch's
    per-parameter counts were [9, 9] for the layer and 12 for the rest after 3 + 3 + 6 steps;
    graphc bias-corrected the layer with the optimizer's 12 (3e-3 off after step 12)."""
    torch = pytest.importorskip("torch")
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    twin.load_state_dict({k: torch.tensor(np.array(v)) for k, v in model.state_dict().items()})
    ours = optim.Adam([{"params": list(model[2].parameters())}, {"params": list(model[0].parameters())}], lr=0.01)
    theirs = torch.optim.Adam([{"params": list(twin[2].parameters())},
                               {"params": list(twin[0].parameters())}], lr=0.01)

    def train(steps):
        step = gc.compile_train_step(model, F.mse_loss, ours, (X, Y), backend="reference")
        for _ in range(steps):
            step(X, Y)
            theirs.zero_grad()
            torch.nn.functional.mse_loss(twin(torch.tensor(X)), torch.tensor(Y)).backward()
            theirs.step()

    train(3)
    frozen, frozen_twin = ours.param_groups.pop(1), theirs.param_groups.pop(1)
    train(3)
    step = gc.compile_train_step(model, F.mse_loss, ours, (X, Y), backend="reference")
    with pytest.warns(UserWarning, match=r"keeps state .* for \['0.weight', '0.bias'\], which no "
                                         r"parameter group holds now: the checkpoint does not hold it"):
        save_checkpoint(str(tmp_path / "frozen.safetensors"), step)
    ours.add_param_group({"params": frozen["params"]})
    theirs.add_param_group({"params": frozen_twin["params"]})
    train(6)
    for key, value in twin.state_dict().items():
        np.testing.assert_allclose(model.state_dict()[key], value.detach().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=key)


def test_a_checkpoint_of_other_groups_is_refused_not_given_swapped_rates(tmp_path):
    """The same parameters in groups of another order: the rates were restored by position
    (the bias got the weight's rate); PyTorch's load_state_dict refuses such a file."""
    def build(order):
        gc.manual_seed(0)
        model = nn.Linear(3, 2)
        groups = {"weight": {"params": [model.weight], "lr": 0.05}, "bias": {"params": [model.bias], "lr": 0.001}}
        opt = optim.SGD([groups[name] for name in order], lr=0.1)
        return gc.compile_train_step(model, F.mse_loss, opt, (X, Y), backend="reference")

    path = str(tmp_path / "ckpt.safetensors")
    save_checkpoint(path, build(["weight", "bias"]))
    load_checkpoint(path, build(["weight", "bias"]))
    with pytest.raises(gc.SerializationError, match=r"parameter groups .*\[\['weight'\], \['bias'\]\]"):
        load_checkpoint(path, build(["bias", "weight"]))


def test_an_exported_grouped_step_keeps_each_groups_rate(tmp_path):
    name, defaults, first, second = CASES[2]
    gc.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = grouped(name, defaults, first, second, [model.weight, model.bias])
    step = gc.compile_train_step(model, F.mse_loss, opt, (X, Y), backend="reference")
    step(X, Y)
    path = str(tmp_path / "step.graphc")
    step.export(path)
    loaded = gc.load(path, backend="reference")
    assert loaded.lrs == [0.01, 0.03]
    with pytest.raises(GraphcError, match="different learning rates"):
        loaded.lr
    for lrs in ([0.01, 0.03], [0.02, 0.001]):  # the same rates, then new ones, on both
        loaded.lrs = list(lrs)
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        assert loaded(X, Y) == step(X, Y)
    np.testing.assert_array_equal(loaded.state_dict()["weight"], model.weight)
    loaded.export(path)
    assert gc.load(path, backend="reference").lrs == [0.02, 0.001]


SIMULATED_CUDA = textwrap.dedent("""
    import numpy as np, graphc as gc
    from graphc import nn, optim
    import graphc.nn.functional as F
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    y = np.zeros((4, 2), np.float32)
    weights = []
    for backend in ("reference", "numba-cuda"):
        gc.manual_seed(0)
        model = nn.Linear(3, 2)
        opt = optim.AdamW([{"params": [model.weight], "weight_decay": 0.1},
                           {"params": [model.bias], "lr": 0.05, "weight_decay": 0.0}], lr=0.01)
        step = gc.compile_train_step(model, F.mse_loss, opt, (x, y), backend=backend)
        for lr in (0.05, 0.2, 0.0):
            opt.param_groups[1]["lr"] = lr
            step(x, y)
        assert len(step._compiled) == 1
        weights.append(model.state_dict())
    for key in weights[0]:
        np.testing.assert_allclose(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-6)
    print("same weights")
""")


def test_rates_reach_a_step_whose_state_stays_on_the_device():
    """numba-cuda keeps parameters and optimizer state on the device between steps; the rates,
    inputs that change, are passed at every call (Numba's simulator, in a child process:
    it must be switched on before numba is imported)."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    child = subprocess.run([sys.executable, "-c", SIMULATED_CUDA], env=env, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0 and "same weights" in child.stdout, child.stderr[-2000:]


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.unused = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(3, 3)

    def forward(self, x):
        return self.second(gc.tanh(self.first(x)))


def adam_steps(rate, grads, betas=(0.9, 0.999), eps=1e-8):
    """Adam from its first step over `grads` (NumPy, float64): the updates it makes."""
    m = v = 0.0
    updates = []
    for t, g in enumerate(grads, 1):
        m, v = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
        updates.append(-rate / (1 - betas[0] ** t) * m / (np.sqrt(v) / np.sqrt(1 - betas[1] ** t) + eps))
    return updates


def test_a_group_added_later_counts_its_own_steps_as_pytorch(tmp_path):
    """Adam's bias correction for a group added after 5 steps used step 6 (its first update
    about half of lr); SGD's momentum buffer set up later started damped. Such a parameter now
    counts its own steps ("step" in its state), which checkpoints keep: a fresh process
    resuming from one goes on as the first."""
    def build(added):
        gc.manual_seed(0)
        model = WithUnused()
        opt = optim.Adam(model.second.parameters(), lr=0.01)
        if added:
            opt.add_param_group({"params": list(model.first.parameters())})
        return model, opt, gc.compile_train_step(model, F.mse_loss, opt, (X, Y), backend="reference")
    model, opt, step = build(added=False)
    for _ in range(5):
        step(X, Y)
    opt.add_param_group({"params": list(model.first.parameters())})
    step = gc.compile_train_step(model, F.mse_loss, opt, (X, Y), backend="reference")
    before = model.first.weight.copy()
    grad = gc.grad(lambda w: F.mse_loss(nn.functional_call(model, {"first.weight": w}, X), Y))(before)
    step(X, Y)
    np.testing.assert_allclose(model.first.weight - before, adam_steps(0.01, [grad])[0], rtol=1e-4, atol=1e-7)
    assert step.opt_state["first.weight"]["step"] == 1 and "step" not in step.opt_state["second.weight"]
    assert step.step_count == 6
    save_checkpoint(str(tmp_path / "ckpt"), step)
    _, _, resumed = build(added=True)  # all groups from the start: no own counts
    load_checkpoint(str(tmp_path / "ckpt"), resumed)
    assert resumed.opt_state["first.weight"]["step"] == 1
    for _ in range(2):
        assert resumed(X, Y) == step(X, Y)
    # a checkpoint without them (an older graphc's): each parameter counted the step's steps
    from safetensors.numpy import load, save

    from graphc.export import tensor_digest
    with open(tmp_path / "ckpt", "rb") as f:
        arrays = {k: v for k, v in load(f.read()).items() if not k.endswith("/step")}
    with open(tmp_path / "older", "wb") as f:
        f.write(save(arrays, metadata={"format": "graphc.checkpoint", "version": "2",
                                       **{f"sha256/{k}": tensor_digest(v) for k, v in arrays.items()}}))
    load_checkpoint(str(tmp_path / "older"), resumed)
    assert resumed.opt_state["first.weight"]["step"] == 6 == resumed.step_count
    # a refused file changes nothing: its own step counts are not taken up first
    with open(tmp_path / "ckpt", "rb") as f:
        data = bytearray(f.read())
    data[-1] ^= 0x40  # the last tensor's last byte: it fails its checksum
    with open(tmp_path / "corrupted", "wb") as f:
        f.write(bytes(data))
    _, _, fresh = build(added=True)
    with pytest.raises(gc.GraphcError, match="fails its checksum"):
        load_checkpoint(str(tmp_path / "corrupted"), fresh)
    assert "step" not in fresh.opt_state["first.weight"]

    gc.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = optim.SGD(model.parameters(), lr=0.1, dampening=0.5)
    step = gc.compile_train_step(model, F.mse_loss, opt, (X, Y), backend="reference")
    step(X, Y)
    opt.param_groups[0]["momentum"] = 0.9
    step = gc.compile_train_step(model, F.mse_loss, opt, (X, Y), backend="reference")
    before = model.weight.copy()
    grad = gc.grad(lambda w: F.mse_loss(nn.functional_call(model, {"weight": w}, X), Y))(before)
    step(X, Y)  # the buffer's first step is the gradient itself, undamped
    np.testing.assert_allclose(model.weight, before - 0.1 * grad, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_parameters_the_loss_does_not_read_are_not_updated(backend):
    """As PyTorch skips a parameter without a gradient: weight decay changed them."""
    gc.manual_seed(0)
    model = WithUnused()
    unused = {k: v.copy() for k, v in model.unused.state_dict().items()}
    opt = optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    step = gc.compile_train_step(model, F.mse_loss, opt, (X, Y), backend=backend, clip_grad_norm=1.0)
    for _ in range(3):
        step(X, Y)
    for name, value in unused.items():
        np.testing.assert_array_equal(model.unused.state_dict()[name], value)
        np.testing.assert_array_equal(step.opt_state[f"unused.{name}"]["exp_avg"], 0.0)
    assert not np.all(step.opt_state["first.weight"]["exp_avg"] == 0)
