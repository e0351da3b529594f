"""Ported models (issue 19): a GPT-style decoder and a ResNet-18-style CNN written once for
PyTorch and once for graphc the way a port is written -- the same class text with the imports
changed -- start from PyTorch's own state_dict (loaded through load_state_dict), train five steps
with graphc's compiled step and with PyTorch's usual loop, and must agree on every loss, on the
final weights (buffers included), and on the eval output after graphc's trained state_dict is
loaded back into the PyTorch model.

Every line where the graphc text differs from the PyTorch text carries a "graphc:" comment
saying why: each one is something a port has to change by hand.

The ResNet trains in float32, as both frameworks do by default. The GPT trains in float64: the
bias of the attention keys has a gradient of exactly zero (a constant added to every key moves
no softmax), so both frameworks hand AdamW round-off noise there, and in float32 that noise is
near eps=1e-8 and AdamW turns it into updates of ~lr that differ between any two correct
implementations (measured: 1.2e-3 apart after five steps, while every loss agreed to 1e-7). In
float64 the noise is far below eps and the updates it causes vanish."""
import numpy as np
import pytest

import graphc as gc

torch = pytest.importorskip("torch")

STEPS = 5
TOLERANCES = {np.float32: {"rtol": 1e-4, "atol": 1e-5}, np.float64: {"rtol": 1e-9, "atol": 1e-11}}


# ---------------------------------------------------------------------------------------------
# The GPT-style decoder (nanoGPT's layout: pre-norm blocks, fused qkv, causal SDPA, GELU MLP,
# lm_head tied to the token embedding), AdamW with decay / no-decay groups, linear warm-up then
# cosine decay.
# ---------------------------------------------------------------------------------------------

def torch_gpt_classes():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torch import optim

    class CausalSelfAttention(nn.Module):
        def __init__(self, n_embd, n_head):
            super().__init__()
            self.c_attn = nn.Linear(n_embd, 3 * n_embd)
            self.c_proj = nn.Linear(n_embd, n_embd)
            self.n_head, self.n_embd = n_head, n_embd

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
            q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.c_proj(y)

    class MLP(nn.Module):
        def __init__(self, n_embd):
            super().__init__()
            self.c_fc = nn.Linear(n_embd, 4 * n_embd)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * n_embd, n_embd)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self, n_embd, n_head):
            super().__init__()
            self.ln_1 = nn.LayerNorm(n_embd)
            self.attn = CausalSelfAttention(n_embd, n_head)
            self.ln_2 = nn.LayerNorm(n_embd)
            self.mlp = MLP(n_embd)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self, vocab_size, block_size, n_embd, n_head, n_layer):
            super().__init__()
            self.tok_emb = nn.Embedding(vocab_size, n_embd)
            self.pos_emb = nn.Embedding(block_size, n_embd)
            self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
            self.ln_f = nn.LayerNorm(n_embd)
            self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
            self.lm_head.weight = self.tok_emb.weight  # weight tying

        def forward(self, idx):
            b, t = idx.size()
            pos = torch.arange(0, t, dtype=torch.long)
            x = self.tok_emb(idx) + self.pos_emb(pos)
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln_f(x))

        def configure_optimizers(self, weight_decay, learning_rate, betas):
            # Decay the matrices of the Linear layers only; biases, LayerNorm and embeddings
            # (the lm_head matrix is the token embedding) are not decayed.
            decay, no_decay = [], []
            for name, p in self.named_parameters():
                if p.dim() >= 2 and not name.endswith("emb.weight"):
                    decay.append(p)
                else:
                    no_decay.append(p)
            groups = [{"params": decay, "weight_decay": weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}]
            return optim.AdamW(groups, lr=learning_rate, betas=betas)

    def gpt_loss(logits, targets):
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def warmup_cosine(optimizer, warmup, total):
        warm = optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
        decay = optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=1e-4)
        return optim.lr_scheduler.SequentialLR(optimizer, [warm, decay], milestones=[warmup])

    return GPT, gpt_loss, warmup_cosine


def graphc_gpt_classes():
    import graphc as gc
    import graphc.nn as nn
    import graphc.nn.functional as F
    from graphc import optim

    class CausalSelfAttention(nn.Module):
        def __init__(self, n_embd, n_head):
            super().__init__()
            self.c_attn = nn.Linear(n_embd, 3 * n_embd)
            self.c_proj = nn.Linear(n_embd, n_embd)
            self.n_head, self.n_embd = n_head, n_embd

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
            q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.c_proj(y)

    class MLP(nn.Module):
        def __init__(self, n_embd):
            super().__init__()
            self.c_fc = nn.Linear(n_embd, 4 * n_embd)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * n_embd, n_embd)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self, n_embd, n_head):
            super().__init__()
            self.ln_1 = nn.LayerNorm(n_embd)
            self.attn = CausalSelfAttention(n_embd, n_head)
            self.ln_2 = nn.LayerNorm(n_embd)
            self.mlp = MLP(n_embd)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self, vocab_size, block_size, n_embd, n_head, n_layer):
            super().__init__()
            self.tok_emb = nn.Embedding(vocab_size, n_embd)
            self.pos_emb = nn.Embedding(block_size, n_embd)
            self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
            self.ln_f = nn.LayerNorm(n_embd)
            self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
            self.lm_head.weight = self.tok_emb.weight  # weight tying

        def forward(self, idx):
            b, t = idx.size()
            pos = gc.arange(0, t, dtype=gc.long)
            x = self.tok_emb(idx) + self.pos_emb(pos)
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln_f(x))

        def configure_optimizers(self, weight_decay, learning_rate, betas):
            # Decay the matrices of the Linear layers only; biases, LayerNorm and embeddings
            # (the lm_head matrix is the token embedding) are not decayed.
            decay, no_decay = [], []
            for name, p in self.named_parameters():
                # graphc: parameters are NumPy arrays outside a trace, which have .ndim but no
                # .dim() (torch tensors have both, so .ndim ports; .dim() does not)
                if p.ndim >= 2 and not name.endswith("emb.weight"):
                    decay.append(p)
                else:
                    no_decay.append(p)
            groups = [{"params": decay, "weight_decay": weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}]
            return optim.AdamW(groups, lr=learning_rate, betas=betas)

    def gpt_loss(logits, targets):
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def warmup_cosine(optimizer, warmup, total):
        warm = optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
        decay = optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=1e-4)
        return optim.lr_scheduler.SequentialLR(optimizer, [warm, decay], milestones=[warmup])

    return GPT, gpt_loss, warmup_cosine


GPT_CONFIG = {"vocab_size": 17, "block_size": 8, "n_embd": 16, "n_head": 2, "n_layer": 2}
GPT_OPTIM = {"weight_decay": 0.1, "learning_rate": 3e-3, "betas": (0.9, 0.95)}
WARMUP = 2


def gpt_batches(steps):
    rng = np.random.default_rng(0)
    vocab, t = GPT_CONFIG["vocab_size"], GPT_CONFIG["block_size"]
    data = rng.integers(0, vocab, size=(steps, 4, t + 1))
    return [(d[:, :-1].copy(), d[:, 1:].copy()) for d in data]


def gpt_pair():
    """The PyTorch GPT and its graphc port holding the same float64 weights."""
    torch.manual_seed(0)
    torch_model = torch_gpt_classes()[0](**GPT_CONFIG).double()
    graphc_model = graphc_gpt_classes()[0](**GPT_CONFIG).double()
    graphc_model.load_state_dict(torch_model.state_dict())
    return torch_model, graphc_model


def train_torch_gpt(model, batches):
    _, gpt_loss, warmup_cosine = torch_gpt_classes()
    opt = model.configure_optimizers(**GPT_OPTIM)
    sched = warmup_cosine(opt, WARMUP, STEPS)
    losses = []
    for x, y in batches:
        loss = gpt_loss(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def train_graphc_gpt(model, batches, backend=None):
    _, gpt_loss, warmup_cosine = graphc_gpt_classes()
    opt = model.configure_optimizers(**GPT_OPTIM)
    sched = warmup_cosine(opt, WARMUP, STEPS)
    step = gc.compile_train_step(model, gpt_loss, opt, batches[0], backend=backend)
    losses = []
    for x, y in batches:
        losses.append(step(x, y))
        sched.step()
    return losses


def assert_same_training(dtype, torch_model, torch_losses, graphc_model, graphc_losses):
    tolerance = TOLERANCES[dtype]
    assert len(set(torch_losses)) == STEPS  # the model trained: every step's loss differs
    np.testing.assert_allclose(graphc_losses, torch_losses, rtol=tolerance["rtol"],
                               err_msg="losses step by step (graphc, then PyTorch)")
    theirs, ours = torch_model.state_dict(), graphc_model.state_dict()
    # PyTorch's names (graphc lists every parameter before every buffer, PyTorch goes module by
    # module: the order differs for the ResNet)
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.numpy().dtype, name
        np.testing.assert_allclose(ours[name], value.numpy(), **tolerance, err_msg=name)


def assert_round_trip(dtype, torch_model, graphc_model, example):
    """graphc's trained state_dict loads into the PyTorch model and gives graphc's eval output
    (running statistics for the BatchNorms). The eval graph runs on the reference backend: what
    is checked here is the state dict, and a second numba-cpu compilation would double the
    test's time."""
    graphc_model.eval()
    ours = gc.compile(graphc_model, example, backend="reference")(example)
    torch_model.load_state_dict({k: torch.from_numpy(v.copy())
                                 for k, v in graphc_model.state_dict().items()})
    torch_model.eval()
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(example)).numpy()
    np.testing.assert_allclose(ours, theirs, **TOLERANCES[dtype])


@pytest.mark.slow
def test_gpt_trains_like_pytorch_on_numba_cpu():
    batches = gpt_batches(STEPS)
    torch_model, graphc_model = gpt_pair()
    torch_losses = train_torch_gpt(torch_model, batches)
    graphc_losses = train_graphc_gpt(graphc_model, batches)
    assert_same_training(np.float64, torch_model, torch_losses, graphc_model, graphc_losses)
    assert_round_trip(np.float64, torch_model, graphc_model, batches[0][0])


def test_gpt_trains_like_pytorch_on_reference():
    batches = gpt_batches(STEPS)
    torch_model, graphc_model = gpt_pair()
    torch_losses = train_torch_gpt(torch_model, batches)
    graphc_losses = train_graphc_gpt(graphc_model, batches, backend="reference")
    assert_same_training(np.float64, torch_model, torch_losses, graphc_model, graphc_losses)
    assert_round_trip(np.float64, torch_model, graphc_model, batches[0][0])


def test_gpt_tied_head_is_one_parameter():
    """The port's `self.lm_head.weight = self.tok_emb.weight` ties them as PyTorch does: one
    array, listed once among the parameters, under both names in the state dict."""
    GPT, _, _ = graphc_gpt_classes()
    model = GPT(**GPT_CONFIG)
    assert model.lm_head.weight is model.tok_emb.weight
    names = [name for name, _ in model.named_parameters()]
    assert "tok_emb.weight" in names and "lm_head.weight" not in names
    assert {"tok_emb.weight", "lm_head.weight"} <= set(model.state_dict())


# ---------------------------------------------------------------------------------------------
# The ResNet-18-style CNN (torchvision's BasicBlock and stem, tiny widths), SGD with momentum
# and weight decay.
# ---------------------------------------------------------------------------------------------

def torch_resnet_classes():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torch import optim

    class BasicBlock(nn.Module):
        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            identity = x
            out = self.conv1(x)
            out = self.bn1(out)
            out = self.relu(out)
            out = self.conv2(out)
            out = self.bn2(out)
            if self.downsample is not None:
                identity = self.downsample(x)
            out += identity
            out = self.relu(out)
            return out

    class ResNet(nn.Module):
        def __init__(self, layers=(2, 2, 2), widths=(8, 16, 32), num_classes=10):
            super().__init__()
            self.inplanes = widths[0]
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(self.inplanes)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(widths[0], layers[0])
            self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
            self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(widths[2], num_classes)

        def _make_layer(self, planes, blocks, stride=1):
            downsample = None
            if stride != 1 or self.inplanes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes))
            layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes
            for _ in range(1, blocks):
                layers.append(BasicBlock(self.inplanes, planes))
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.conv1(x)
            x = self.bn1(x)
            x = self.relu(x)
            x = self.maxpool(x)
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.avgpool(x)
            x = torch.flatten(x, 1)
            x = self.fc(x)
            return x

    def make_optimizer(model):
        return optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    return ResNet, F.cross_entropy, make_optimizer


def graphc_resnet_classes():
    import graphc as gc
    import graphc.nn as nn
    import graphc.nn.functional as F
    from graphc import optim

    class BasicBlock(nn.Module):
        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            identity = x
            out = self.conv1(x)
            out = self.bn1(out)
            out = self.relu(out)
            out = self.conv2(out)
            out = self.bn2(out)
            if self.downsample is not None:
                identity = self.downsample(x)
            out += identity
            out = self.relu(out)
            return out

    class ResNet(nn.Module):
        def __init__(self, layers=(2, 2, 2), widths=(8, 16, 32), num_classes=10):
            super().__init__()
            self.inplanes = widths[0]
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(self.inplanes)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(widths[0], layers[0])
            self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
            self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(widths[2], num_classes)

        def _make_layer(self, planes, blocks, stride=1):
            downsample = None
            if stride != 1 or self.inplanes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes))
            layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes
            for _ in range(1, blocks):
                layers.append(BasicBlock(self.inplanes, planes))
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.conv1(x)
            x = self.bn1(x)
            x = self.relu(x)
            x = self.maxpool(x)
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.avgpool(x)
            x = gc.flatten(x, 1)
            x = self.fc(x)
            return x

    def make_optimizer(model):
        return optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    return ResNet, F.cross_entropy, make_optimizer


def resnet_batches(steps):
    rng = np.random.default_rng(1)
    return [(rng.standard_normal((4, 3, 16, 16)).astype(np.float32), rng.integers(0, 10, size=4))
            for _ in range(steps)]


def resnet_pair():
    """The PyTorch ResNet and its graphc port holding the same float32 weights and buffers."""
    torch.manual_seed(0)
    torch_model = torch_resnet_classes()[0]()
    graphc_model = graphc_resnet_classes()[0]()
    graphc_model.load_state_dict(torch_model.state_dict())
    return torch_model, graphc_model


def train_torch_resnet(model, batches):
    _, loss_fn, make_optimizer = torch_resnet_classes()
    opt = make_optimizer(model)
    losses = []
    for x, y in batches:
        loss = loss_fn(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_graphc_resnet(model, batches, backend=None):
    _, loss_fn, make_optimizer = graphc_resnet_classes()
    opt = make_optimizer(model)
    step = gc.compile_train_step(model, loss_fn, opt, batches[0], backend=backend)
    return [step(x, y) for x, y in batches]


@pytest.mark.slow
def test_resnet_trains_like_pytorch_on_numba_cpu():
    batches = resnet_batches(STEPS)
    torch_model, graphc_model = resnet_pair()
    torch_losses = train_torch_resnet(torch_model, batches)
    graphc_losses = train_graphc_resnet(graphc_model, batches)
    assert_same_training(np.float32, torch_model, torch_losses, graphc_model, graphc_losses)
    assert_round_trip(np.float32, torch_model, graphc_model, batches[0][0])


def test_resnet_trains_like_pytorch_on_reference():
    batches = resnet_batches(STEPS)
    torch_model, graphc_model = resnet_pair()
    torch_losses = train_torch_resnet(torch_model, batches)
    graphc_losses = train_graphc_resnet(graphc_model, batches, backend="reference")
    assert_same_training(np.float32, torch_model, torch_losses, graphc_model, graphc_losses)
    assert_round_trip(np.float32, torch_model, graphc_model, batches[0][0])


# ---------------------------------------------------------------------------------------------
# What the ports needed from graphc: `inplace=` on activations and dropout (torchvision's
# nn.ReLU(inplace=True) raised a TypeError).
# ---------------------------------------------------------------------------------------------

def test_inplace_activations_change_their_input_as_in_pytorch():
    """PyTorch code may rely on the side effect (the result unassigned): the input Tensor takes
    the activation's value, and gradients flow through it as through the returned one."""
    import graphc.nn as gnn
    import graphc.nn.functional as GF

    def graphc_fn(x):
        h, e, g = x * 2.0, x - 0.3, x * 3.0
        GF.leaky_relu(h, 0.1, inplace=True)
        gnn.ELU(inplace=True)(e)
        GF.silu(g, inplace=True)
        r = gnn.ReLU(inplace=True)(x + 0.5)
        gnn.Dropout(0.5, inplace=True).eval()(r)
        return (h * e + g * r).sum()

    def torch_fn(x):
        h, e, g = x * 2.0, x - 0.3, x * 3.0
        torch.nn.functional.leaky_relu(h, 0.1, inplace=True)
        torch.nn.ELU(inplace=True)(e)
        torch.nn.functional.silu(g, inplace=True)
        r = torch.nn.ReLU(inplace=True)(x + 0.5)
        torch.nn.Dropout(0.5, inplace=True).eval()(r)
        return (h * e + g * r).sum()

    x = np.random.default_rng(2).standard_normal((3, 4))
    value, grad = gc.value_and_grad(graphc_fn, backend="reference")(x)
    tx = torch.tensor(x, requires_grad=True)
    expected = torch_fn(tx)
    expected.backward()
    np.testing.assert_allclose(value, expected.item(), rtol=1e-12)
    np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-12, atol=1e-14)
    assert repr(gnn.ReLU(inplace=True)) == repr(torch.nn.ReLU(inplace=True))
    assert repr(gnn.Dropout(0.2)) == repr(torch.nn.Dropout(0.2))
