"""The conv guard (rift_dist/models/conv_guard.py): torch 2.14.1's crashing CPU convolution kernels (issue 11).

The crash itself happens only on AVX2-only CPUs; here the guard is proven by the exact repro run in
subprocesses (a regression is a failed test, not a dead suite), by a fake crashing probe child and
by forced routing compared against the normal path.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rift_dist.models import build_model_from, list_modules
from rift_dist.models import conv_guard as G
from rift_dist.precision import cpu_has_bf16, fold_batchnorm

REPRO_SETUP = """
import sys, torch
torch.manual_seed(0)
grad_out = torch.randn(16, 8, 16, 16).contiguous(memory_format=torch.channels_last)
inp = torch.randn(16, 4, 32, 32).contiguous(memory_format=torch.channels_last)
w = torch.randn(8, 4, 1, 1)
"""

UNGUARDED = REPRO_SETUP + """
gi, gw, _ = torch.ops.aten.convolution_backward.default(
    grad_out, inp, w, [0], (2, 2), (0, 0), (1, 1), False, (0, 0), 1, [True, True, False])
torch.save({"gi": gi, "gw": gw}, sys.argv[1])
"""

GUARDED = REPRO_SETUP + """
from torch import nn
from rift_dist.models.conv_guard import GuardedConv2d, route_conv
conv = nn.Conv2d(4, 8, 1, 2, bias=False)
with torch.no_grad():
    conv.weight.copy_(w)
route_conv(conv)
assert isinstance(conv, nn.Conv2d) and type(conv) is GuardedConv2d
x = inp.clone().requires_grad_(True)
y = conv(x)
assert y.shape == (16, 8, 16, 16) and y.is_contiguous(memory_format=torch.channels_last)
y.backward(grad_out)
torch.save({"gi": x.grad, "gw": conv.weight.grad}, sys.argv[1])
"""


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RIFT_CONV_PROBE_CACHE", str(tmp_path / "probe"))
    monkeypatch.delenv(G._FAKE_CRASH_ENV, raising=False)
    monkeypatch.delenv("RIFT_CONV_GUARD", raising=False)


def _run(code: str, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RIFT_CONV_GUARD": "off"})


def test_exact_repro_guarded_never_dies_and_matches_the_kernel(tmp_path):
    guarded = _run(GUARDED, tmp_path / "g.pt")
    assert guarded.returncode == 0, f"the guarded repro died (rc {guarded.returncode}): {guarded.stderr[-2000:]}"
    g = torch.load(tmp_path / "g.pt")
    plain = _run(UNGUARDED, tmp_path / "u.pt")
    if plain.returncode < 0:
        print(f"the unguarded convolution_backward crashes on this machine (signal {-plain.returncode})")
        # the guard must still give the mathematically right answer: 1x1 stride-2 conv by hand
        torch.manual_seed(0)
        go = torch.randn(16, 8, 16, 16)
        inp = torch.randn(16, 4, 32, 32)
        w = torch.randn(8, 4, 1, 1)
        gi = torch.zeros_like(inp)
        gi[:, :, ::2, ::2] = torch.einsum("bohw,oc->bchw", go, w[:, :, 0, 0])
        gw = torch.einsum("bohw,bchw->oc", go, inp[:, :, ::2, ::2])[:, :, None, None]
        ref = {"gi": gi, "gw": gw}
    else:
        assert plain.returncode == 0, plain.stderr[-2000:]
        ref = torch.load(tmp_path / "u.pt")
    torch.testing.assert_close(g["gi"], ref["gi"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g["gw"], ref["gw"], rtol=1e-5, atol=1e-4)
    assert g["gi"].abs().sum() > 0 and g["gw"].abs().sum() > 0


def test_probe_records_a_crashing_child_and_continues(monkeypatch, tmp_path):
    sig = G.ConvSig(4, 8, (1, 1), (2, 2), (0, 0), (1, 1), 1, 32, 32)
    cases = G.cases_for(sig)
    victim = next(c for c in cases if "|fp32|cl|b16|w|" in c)
    assert cases.index(victim) not in (0, len(cases) - 1)  # cases on both sides of the crash
    monkeypatch.setenv(G._FAKE_CRASH_ENV, victim)
    res = G.probe({sig})
    assert set(res) == set(cases)
    assert res[victim] == "crash"
    assert G.crashing(res) == [victim]
    assert all(r == "ok" for c, r in res.items() if c != victim)  # the run continued past the crash
    on_disk = json.loads(G.cache_file().read_text())
    assert on_disk["cases"][victim] == "crash" and on_disk["key"]["torch"] == torch.__version__
    assert G.cache_file().parent == tmp_path / "probe"

    def no_subprocess(*a, **k):
        raise AssertionError("the cached probe started a subprocess")

    monkeypatch.setattr(G.subprocess, "Popen", no_subprocess)
    assert G.probe({sig}) == res  # second call: from the cache


def test_auto_routes_the_crashing_class_from_the_cache(monkeypatch):
    monkeypatch.setenv("RIFT_CONV_GUARD", "off")
    plain = build_model_from("resnet18", 10, width=4)
    sigs = G.conv_signatures(plain, 32)
    assert len(sigs) == 20 and sigs["layer2.0.shortcut.0"].tag() == "c4-o8-k1x1-s2x2-p0x0-d1x1-g1-32x32"
    # pretend this machine crashes on the repro's shape at one batch size / mask / layout only
    # (the real probe of these shapes is what test_probe_records_a_crashing_child_and_continues runs)
    cases = {c: "ok" for s in set(sigs.values()) for c in G.cases_for(s)}
    cases.update({c: "ok" for c in G.cases_for(sigs["layer2.0.shortcut.0"], "guarded")})
    bad = next(c for c in G.cases_for(sigs["layer2.0.shortcut.0"]) if "|cl|b32|iw|" in c)
    cases[bad] = "crash"
    G._write_cache(G.cache_file(), cases)
    monkeypatch.setenv("RIFT_CONV_GUARD", "auto")
    monkeypatch.setattr(G.subprocess, "Popen", lambda *a, **k: (_ for _ in ()).throw(AssertionError("probed")))
    model = build_model_from("resnet18", 10, width=4)
    routed = [n for n, m in model.named_modules() if type(m) is G.GuardedConv2d]
    same_class = [n for n, s in sigs.items() if s.routing_class() == ((1, 1), (2, 2), 4)]
    assert routed == same_class == ["layer2.0.shortcut.0"]
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_mode_switch(monkeypatch):
    monkeypatch.setenv("RIFT_CONV_GUARD", "bogus")
    with pytest.raises(ValueError, match="RIFT_CONV_GUARD"):
        build_model_from("resnet18", 10, width=4)
    monkeypatch.setenv("RIFT_CONV_GUARD", "off")
    assert G.guard_model(build_model_from("resnet18", 10, width=4)) == []
    assert not G.cache_file().exists()  # off: no probe


def _pair(channels_last: bool, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("RIFT_CONV_GUARD", "off")
    plain = build_model_from("resnet18", 10, width=4, mean=(0.5,) * 3, std=(0.25,) * 3)
    guarded = copy.deepcopy(plain)
    monkeypatch.setenv("RIFT_CONV_GUARD", "force")
    routed = G.guard_model(guarded)
    assert len(routed) == 20 and all(isinstance(guarded.get_submodule(n), nn.Conv2d) for n in routed)
    if channels_last:
        plain = plain.to(memory_format=torch.channels_last)
        guarded = guarded.to(memory_format=torch.channels_last)
    return plain, guarded


def _fwd_bwd(model, x, autocast_bf16=False, weight_only=False):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(not weight_only)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
        y = model(x)
    F.cross_entropy(y.float(), torch.arange(x.shape[0]) % 10).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return y, (None if weight_only else x.grad), grads


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_forced_routing_equals_the_normal_path(channels_last, monkeypatch):
    plain, guarded = _pair(channels_last, monkeypatch)
    x = torch.rand(8, 3, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y0, gx0, g0 = _fwd_bwd(plain, x)
    y1, gx1, g1 = _fwd_bwd(guarded, x)
    assert y1.dtype == y0.dtype == torch.float32
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    # eval + BatchNorm folding keeps the guard (deepcopy keeps the class) and still matches
    f0, f1 = fold_batchnorm(plain.eval()), fold_batchnorm(guarded.eval())
    convs = [m for _, m in list_modules(f1) if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is G.GuardedConv2d and m.bias is not None for m in convs)
    xe = x.clone().requires_grad_(True)
    xe0 = x.clone().requires_grad_(True)
    out1, out0 = f1(xe), f0(xe0)
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1, plain(x), rtol=1e-4, atol=1e-4)
    out1.sum().backward()
    out0.sum().backward()
    torch.testing.assert_close(xe.grad, xe0.grad, rtol=1e-4, atol=1e-6)  # PGD-style input-only grad


@pytest.mark.skipif(not cpu_has_bf16(), reason="no native bf16 on this CPU")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_forced_routing_bf16_autocast(channels_last, monkeypatch):
    plain, guarded = _pair(channels_last, monkeypatch)
    x = torch.rand(8, 3, 32, 32)
    y0, gx0, g0 = _fwd_bwd(plain, x, autocast_bf16=True)
    y1, gx1, g1 = _fwd_bwd(guarded, x, autocast_bf16=True)
    assert y1.dtype == y0.dtype == torch.bfloat16
    # bf16 tolerance: the guarded path's error against float32 is of the size of the normal bf16 path's
    yf, gxf, gf = _fwd_bwd(plain, x)

    def rel(a, b):
        return float((a.detach().float() - b.detach()).norm() / b.detach().norm())

    pairs = [("logits", y0, y1, yf), ("input grad", gx0, gx1, gxf)] + [(n, g0[n], g1[n], gf[n]) for n in gf]
    for n, a0, a1, af in pairs:
        e0, e1 = rel(a0, af), rel(a1, af)
        print(f"{n}: bf16 normal {e0:.3g}, bf16 guarded {e1:.3g} (relative to float32)")
        assert e1 <= 2 * e0 + 2e-2, f"{n}: guarded bf16 error {e1:.3g} vs normal bf16 {e0:.3g}"


def test_training_step_and_mrc_weight_only_backward(monkeypatch):
    plain, guarded = _pair(True, monkeypatch)
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for m in (plain, guarded):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        _fwd_bwd(m, x)
        opt.step()
    for (n, p0), p1 in zip(plain.named_parameters(), guarded.parameters()):
        torch.testing.assert_close(p1, p0, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    # MRC: frozen eval model, input without grad, gradient of the loss w.r.t. one module's weight
    for m in (plain, guarded):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        m.get_submodule("layer2.0.shortcut.0").weight.requires_grad_(True)
    w0 = torch.autograd.grad(F.cross_entropy(plain(x), torch.arange(8)), plain.layer2[0].shortcut[0].weight)[0]
    w1 = torch.autograd.grad(F.cross_entropy(guarded(x), torch.arange(8)), guarded.layer2[0].shortcut[0].weight)[0]
    assert w1.abs().sum() > 0
    torch.testing.assert_close(w1, w0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k,s,p,d,g", [(3, 2, 1, 1, 2), (3, 1, 2, 2, 1), (1, 1, 1, 1, 1), (5, 3, 2, 1, 1)])
def test_safe_route_matches_conv2d_on_other_shapes(k, s, p, d, g):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, k, s, p, d, groups=g, bias=True)
    ref = copy.deepcopy(conv)
    G.route_conv(conv)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 4, 11, 9).contiguous(memory_format=fmt)
        y0, y1 = ref(x), conv(x)
        assert y1.shape == y0.shape and y1.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)


def test_report_cli_lists_no_crash_on_this_machine(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rift_dist.models.conv_guard", "--report", "--no-probe"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert "conv probe cache:" in out.stdout and "cpu flags:" in out.stdout and "crashing" in out.stdout
