"""ModuleList and ModuleDict register their modules (trained, saved, named as PyTorch names
them); a plain list/dict/tuple/set of modules assigned to a module attribute is refused."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3, 4), nn.Linear(4, 2)])
        self.heads = nn.ModuleDict({"a": nn.Linear(2, 1), "b": nn.Linear(2, 1)})

    def forward(self, x):
        for layer in self.layers:
            x = F.tanh(layer(x))
        return self.heads["a"](x) + self.heads["b"](x)


def test_state_dict_names_follow_pytorch():
    assert list(Stack().state_dict()) == [
        "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
        "heads.a.weight", "heads.a.bias", "heads.b.weight", "heads.b.bias"]


def test_module_list_operations():
    a, b, c, d = (nn.Linear(1, 1) for _ in range(4))
    layers = nn.ModuleList([a])
    layers.append(c)
    layers.insert(1, b)
    layers.extend([d])
    assert len(layers) == 4 and list(layers) == [a, b, c, d]
    assert layers[-1] is d and layers[1] is b
    assert list(layers[1:3]) == [b, c]
    layers[0] = d
    assert layers[0] is d
    del layers[1]
    assert list(layers) == [d, c, d]
    # PyTorch's names; d, held twice, is listed once unless asked otherwise
    assert [name for name, _ in layers.named_modules()] == ["", "0", "1"]
    assert [name for name, _ in layers.named_modules(remove_duplicate=False)] == ["", "0", "1", "2"]
    with pytest.raises(IndexError):
        layers[3]
    with pytest.raises(gc.GraphcError, match="Module instances only"):
        layers.append(np.zeros(3))


def test_module_dict_operations():
    a, b, c = (nn.Linear(1, 1) for _ in range(3))
    heads = nn.ModuleDict([("a", a)])
    heads["b"] = b
    heads.update({"c": c})
    assert len(heads) == 3 and list(heads) == ["a", "b", "c"]
    assert list(heads.keys()) == ["a", "b", "c"] and list(heads.values()) == [a, b, c]
    assert dict(heads.items()) == {"a": a, "b": b, "c": c}
    assert "b" in heads and "z" not in heads and heads["c"] is c
    assert heads.pop("a") is a
    del heads["b"]
    assert list(heads) == ["c"]
    with pytest.raises(gc.GraphcError, match="without '.'"):
        heads["x.y"] = a


def test_contained_modules_are_trained():
    gc.manual_seed(0)
    model = Stack()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    y = np.ones((5, 1), np.float32)
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.1),
                                 (x, y), backend="reference")
    step(x, y)
    after = model.state_dict()
    assert all(not np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("value, fix", [
    (lambda: [nn.Linear(1, 1)], "nn.ModuleList"),
    (lambda: (nn.ReLU(), nn.Linear(1, 1)), "nn.ModuleList"),
    (lambda: {"head": nn.Linear(1, 1)}, "nn.ModuleDict"),
    (lambda: {nn.Linear(1, 1)}, "nn.ModuleList"),
    (lambda: [[1, 2], {"inner": nn.Linear(1, 1)}], "nn.ModuleList"),
])
def test_plain_container_of_modules_is_refused(value, fix):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = value()

    with pytest.raises(gc.GraphcError) as info:
        Model()
    message = str(info.value)
    assert "Model.layers" in message and f"self.layers = {fix}" in message
    assert "test_containers.py" in message  # the user's line


def test_plain_containers_without_modules_are_kept():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.sizes = [3, 4]
            self.config = {"act": "relu", "widths": (1, 2)}

    model = Model()
    assert model.sizes == [3, 4] and model.config["widths"] == (1, 2)


def test_nested_containers_register_under_dotted_names():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(2, 2)})])

    assert list(Model().state_dict()) == ["blocks.0.proj.weight", "blocks.0.proj.bias"]


def test_modules_appended_to_a_plain_list_later_are_found_with_the_parameters():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = []
            for _ in range(2):
                self.blocks.append(nn.Linear(2, 2))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = Model()
    with pytest.raises(gc.GraphcError, match=r"Model\.blocks: a plain list holding modules .*"
                                             r"self\.blocks = nn\.ModuleList"):
        optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(gc.GraphcError, match="Model.blocks"):
        model.state_dict()


def test_a_plain_list_of_registered_submodules_is_allowed():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = nn.Linear(2, 3), nn.Linear(3, 2)
            self.stages = [self.encoder, self.decoder]  # a view of registered modules

    assert list(Model().state_dict()) == ["encoder.weight", "encoder.bias", "decoder.weight",
                                          "decoder.bias"]


def test_sequential_is_edited_as_pytorch_edits_it():
    """append, insert (negative positions too), pop, item assignment and deletion give the
    layers, and the names, PyTorch's Sequential gives; a jitted Sequential follows the edits."""
    layers = [nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1), nn.Tanh(), nn.Sigmoid()]
    seq = nn.Sequential(layers[0], layers[1])
    assert seq.append(layers[2]) is seq
    seq.insert(1, layers[3])
    seq.insert(-1, layers[4])
    assert list(seq) == [layers[0], layers[3], layers[1], layers[4], layers[2]]
    assert seq.pop(1) is layers[3]
    assert list(seq._modules) == ["0", "1", "2", "3"] and seq[-1] is layers[2]
    del seq[0:2]
    assert list(seq) == [layers[4], layers[2]] and list(seq._modules) == ["0", "1"]
    seq[0] = layers[1]
    assert list(seq) == [layers[1], layers[2]]
    with pytest.raises(TypeError, match="not a Module"):
        seq.append(lambda x: x)
    with pytest.raises(IndexError, match="out of range for 2 layers"):
        seq[2]
    with pytest.raises(IndexError, match="out of range"):
        seq.insert(4, nn.ReLU())

    x = np.ones((4, 2), np.float32)
    net = nn.Sequential(layers[0])
    run = gc.jit(net)
    assert run(x).shape == (4, 3)
    net.extend([nn.ReLU(), nn.Linear(3, 1)])
    np.testing.assert_allclose(run(x), gc.jit(net)(x), rtol=1e-6)
    assert run(x).shape == (4, 1)


def test_module_list_pop():
    a, b, c = (nn.Linear(1, 1) for _ in range(3))
    layers = nn.ModuleList([a, b, c])
    assert layers.pop(0) is a and layers.pop() is c
    assert list(layers) == [b] and list(layers._modules) == ["0"]
