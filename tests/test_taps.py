"""Tests for kdforge.taps: hook-based and HF fast-path tensor capture."""

from __future__ import annotations

import gc
import logging
import socket
import weakref

import pytest
import torch
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.taps import (
    TapError,
    TapSpec,
    Taps,
    describe,
    ensure_eager_attention,
    list_module_paths,
    parse_tap,
    unwrap_model,
)

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

N_LAYERS = 3



def tiny_llama(attn: str | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if attn:
        cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (2, 7), generator=g)


def forward_hook_counts(model: nn.Module) -> dict[str, int]:
    return {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}


class TinyCNN(nn.Module):
    def __init__(self, inplace: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            *[
                nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=inplace))
                for c_in, c_out in [(3, 4), (4, 8), (8, 8)]
            ]
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


# --- grammar -----------------------------------------------------------------


def test_parse_tap_grammar():
    assert parse_tap("model.layers.3.mlp") == TapSpec("model.layers.3.mlp", "module", "model.layers.3.mlp")
    explicit = TapSpec("model.layers.3.mlp:output", "module", "model.layers.3.mlp")
    assert parse_tap("model.layers.3.mlp:output") == explicit
    s = parse_tap("model.layers.3:input")
    assert (s.source, s.path, s.io, s.index, s.is_glob) == ("module", "model.layers.3", "input", None, False)
    assert parse_tap("model.layers.*.self_attn:output.1").index == 1
    assert parse_tap("model.layers.0:input.hidden_states").index == "hidden_states"
    assert parse_tap("model.layers.*.mlp").is_glob
    hs = parse_tap("hidden_states")
    assert (hs.source, hs.path, hs.index, hs.hf_flag) == ("hf", "hidden_states", None, "output_hidden_states")
    assert parse_tap("hidden_states.-1").index == -1
    assert parse_tap("attentions.2").hf_flag == "output_attentions"
    assert parse_tap("logits").source == "hf" and parse_tap("logits").hf_flag is None
    # ':output' forces a hook even for names that look like HF output fields
    assert parse_tap("logits:output").source == "module"
    for bad in ["", "a..b", "x:inptu", "hidden_states.last", "logits.0", "x:output."]:
        with pytest.raises(ValueError):
            parse_tap(bad)


def test_tap_error_is_value_error_and_kdforge_error():
    with pytest.raises(KDForgeError):
        parse_tap("")
    assert issubclass(TapError, ValueError)


# --- module taps on Llama ------------------------------------------------------


def test_exact_tap_equals_manual_hook(llama, ids):
    seen = {}
    h = llama.model.layers[1].mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", o))
    taps = Taps(llama, {"mlp": "model.layers.1.mlp", "mlp2": "model.layers.1.mlp:output"})
    with taps.capture() as store:
        llama(input_ids=ids)
    h.remove()
    assert set(store) == {"mlp", "mlp2"}
    assert torch.equal(store["mlp"], seen["mlp"])
    assert store["mlp2"] is store["mlp"]


def test_tuple_output_takes_element_zero(llama, ids):
    # Llama attention returns (attn_output, attn_weights)
    taps = Taps(llama, {"a": "model.layers.0.self_attn", "o": "model.layers.0.self_attn.o_proj"})
    with taps.capture() as store:
        llama(input_ids=ids)
    assert torch.equal(store["a"], store["o"])


def test_input_tap_equals_previous_layer_output_kwargs_called(llama, ids):
    # In transformers 5 the attention module is called with keyword arguments only.
    calls = []
    probe = llama.model.layers[0].self_attn.register_forward_hook(
        lambda m, a, k, o: calls.append((len(a), "hidden_states" in k)), with_kwargs=True
    )
    taps = Taps(
        llama,
        {
            "in1": "model.layers.1:input",
            "out0": "model.layers.0",
            "attn_in": "model.layers.*.self_attn:input",
            "attn_in_named": "model.layers.*.self_attn:input.hidden_states",
            "ln": "model.layers.*.input_layernorm",
        },
    )
    with taps.capture() as store:
        llama(input_ids=ids)
    probe.remove()
    assert calls == [(0, True)], "expected a kwargs-only call; transformers changed how it calls attention"
    assert torch.equal(store["in1"], store["out0"])
    assert len(store["attn_in"]) == N_LAYERS
    for a, b, ln in zip(store["attn_in"], store["attn_in_named"], store["ln"]):
        assert torch.equal(a, ln)
        assert b is a


def test_input_tap_kwargs_out_of_order_and_named():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, mask=None, scale=1.0):
            return self.lin(x) * scale + (0 if mask is None else mask)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x, mask):
            return self.block(scale=2.0, mask=mask, x=x)  # first parameter passed last, by name

    net = Net()
    x, mask = torch.randn(2, 4), torch.randn(2, 4)
    taps = Taps(net, {"x": "block:input", "mask": "block:input.mask", "m1": "block:input.1", "y": "block:output"})
    with taps.capture() as store:
        y = net(x, mask)
    assert store["x"] is x and store["mask"] is mask and store["m1"] is mask and store["y"] is y
    with pytest.raises(ValueError, match="no input 'nope'"):
        with Taps(net, {"n": "block:input.nope"}).capture():
            net(x, mask)


def test_glob_returns_layers_in_order(llama, ids):
    specs = {"layers": "model.layers.*", "mlps": "model.layers.*.mlp"}
    specs.update({f"l{i}": f"model.layers.{i}" for i in range(N_LAYERS)})
    taps = Taps(llama, specs)
    with taps.capture() as store:
        llama(input_ids=ids)
    assert len(store["layers"]) == N_LAYERS  # '*' does not cross dots: no children
    assert len(store["mlps"]) == N_LAYERS
    for i in range(N_LAYERS):
        assert torch.equal(store["layers"][i], store[f"l{i}"])
    assert list_module_paths(llama, "model.layers.*") == [f"model.layers.{i}" for i in range(N_LAYERS)]
    assert len(list_module_paths(llama, "**.q_proj")) == N_LAYERS


def test_glob_order_is_registration_order_not_call_order():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

        def forward(self, x):
            outs = []
            for b in reversed(self.blocks):
                outs.append(b(x))
            return outs

    m = Reversed()
    x = torch.randn(2, 4)
    with Taps(m, {"b": "blocks.*"}).capture() as store:
        m(x)
    for i, t in enumerate(store["b"]):
        assert torch.equal(t, m.blocks[i](x))


def test_student_taps_keep_graph_teacher_no_grad(llama, ids):
    taps = Taps(llama, {"h": "model.layers.*", "v": "model.layers.2.self_attn.v_proj"})
    with taps.capture() as store:
        llama(input_ids=ids)
    assert all(t.requires_grad for t in store["h"]) and store["v"].grad_fn is not None
    (store["h"][1].pow(2).mean() + store["v"].mean()).backward()
    assert llama.model.layers[1].mlp.down_proj.weight.grad is not None
    assert llama.model.layers[2].self_attn.v_proj.weight.grad is not None
    with torch.no_grad(), taps.capture() as store:
        llama(input_ids=ids)
    assert not store["v"].requires_grad


def test_backward_inside_capture_with_checkpointing_adds_no_duplicates():
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)])

        def forward(self, x):
            for b in self.blocks:
                x = checkpoint(b, x, use_reentrant=False)
            return x

    net = Net()
    taps = Taps(net, {"lin": "blocks.*.0"})
    with taps.capture() as store:
        net(torch.randn(3, 4)).sum().backward()  # recomputation re-runs the hooked modules
    assert len(store["lin"]) == 2


# --- HF fast path --------------------------------------------------------------


def test_hf_fast_path_matches_output_hidden_states(llama, ids):
    taps = Taps(
        llama,
        {"hs": "hidden_states", "last": "hidden_states.-1", "h2": "hidden_states.2", "logits": "logits",
         "layers": "model.layers.*"},
    )
    kwargs = taps.needs_hf_outputs()
    assert kwargs == {"output_hidden_states": True}
    with taps.capture() as store:
        out = llama(input_ids=ids, **kwargs)
        taps.collect_outputs(store, out)
    ref = llama(input_ids=ids, output_hidden_states=True)
    assert len(store["hs"]) == N_LAYERS + 1
    for a, b in zip(store["hs"], ref.hidden_states):
        assert torch.allclose(a, b)
    assert torch.allclose(store["last"], ref.hidden_states[-1])
    assert torch.allclose(store["h2"], ref.hidden_states[2])
    assert torch.allclose(store["logits"], ref.logits)
    # entry i (0 < i < L) is the output of decoder layer i-1; the last one is final-normed
    assert torch.equal(store["hs"][1], store["layers"][0])
    assert torch.equal(store["hs"][-1], out.hidden_states[-1])
    assert not torch.allclose(store["hs"][-1], store["layers"][-1])


def test_hf_fast_path_errors(llama, ids):
    taps = Taps(llama, {"hs": "hidden_states.1"})
    with taps.capture() as store:
        out = llama(input_ids=ids)  # forgot needs_hf_outputs()
        with pytest.raises(ValueError, match="output_hidden_states"):
            taps.collect_outputs(store, out)
    with pytest.raises(ValueError, match="indices -4..3"):
        Taps(llama, {"hs": "hidden_states.4"})
    with pytest.raises(ValueError, match="not a Hugging Face model"):
        Taps(TinyCNN(), {"hs": "hidden_states"})


def test_ensure_eager_attention_gives_probabilities(ids):
    model = tiny_llama()
    assert model.config._attn_implementation != "eager"
    assert ensure_eager_attention(model) is True
    assert model.config._attn_implementation == "eager"
    assert model.model.layers[0].self_attn.config._attn_implementation == "eager"
    assert ensure_eager_attention(model) is False
    out = model(input_ids=ids, output_attentions=True)
    assert len(out.attentions) == N_LAYERS
    att = out.attentions[0]
    assert att.shape == (2, 4, ids.shape[1], ids.shape[1])
    assert torch.allclose(att.sum(-1), torch.ones(att.shape[:-1]), atol=1e-5)
    assert torch.all(att.triu(1) == 0)  # causal


def test_attention_tap_switches_to_eager_and_logs_once(ids, caplog):
    model = tiny_llama(attn="sdpa")
    assert model.config._attn_implementation == "sdpa"
    with caplog.at_level(logging.WARNING, logger="kdforge"):
        taps = Taps(model, {"att": "attentions", "att2": "attentions.-1"})
        Taps(model, {"att": "attentions.0"})
    assert sum("eager attention" in r.getMessage() for r in caplog.records) == 1
    assert model.config._attn_implementation == "eager"
    assert taps.needs_hf_outputs() == {"output_attentions": True}
    with taps.capture() as store:
        taps.collect_outputs(store, model(input_ids=ids, **taps.needs_hf_outputs()))
    assert len(store["att"]) == N_LAYERS and store["att2"] is store["att"][-1]
    for a in store["att"]:
        assert torch.allclose(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5)


def test_qkv_projections_tappable_under_sdpa(ids):
    model = tiny_llama(attn="sdpa")
    taps = Taps(model, {"q": "model.layers.*.self_attn.q_proj", "k": "model.layers.*.self_attn.k_proj"})
    with taps.capture() as store:
        model(input_ids=ids)
    assert model.config._attn_implementation == "sdpa"
    assert [t.shape[-1] for t in store["q"]] == [32] * N_LAYERS
    assert [t.shape[-1] for t in store["k"]] == [16] * N_LAYERS  # 2 kv heads x 8


# --- errors, lifetime ----------------------------------------------------------


def test_no_match_error_lists_closest_names(llama):
    with pytest.raises(ValueError) as ei:
        Taps(llama, {"x": "model.layer.2.mlp"})
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("tap 'model.layer.2.mlp' matches no module of LlamaForCausalLM; closest: model.layers.2.mlp")
    closest = msg.split("closest: ")[1].split(", ")
    assert 1 < len(closest) <= 5 and all(c in list_module_paths(llama) for c in closest)
    with pytest.raises(ValueError, match=r"tap 'model\.layer\.\*\.mlp' matches no module .*closest: model\.layers"):
        Taps(llama, {"x": "model.layer.*.mlp"})
    with pytest.raises(ValueError, match="closest: \\(none"):
        Taps(llama, {"x": "zzzzzz"})


def test_hooks_removed_on_exit_and_exception(llama, ids):
    # HF installs its own permanent output-capturing hooks the first time
    # output_hidden_states is requested, so compare against a baseline.
    llama(input_ids=ids, output_hidden_states=True)
    before = forward_hook_counts(llama)
    taps = Taps(llama, {"h": "model.layers.*", "m": "model.layers.0.mlp", "i": "model.layers.1:input"})
    with taps.capture():
        assert forward_hook_counts(llama) != before
        llama(input_ids=ids)
    assert forward_hook_counts(llama) == before
    with pytest.raises(RuntimeError, match="boom"):
        with taps.capture():
            llama(input_ids=ids)
            raise RuntimeError("boom")
    assert forward_hook_counts(llama) == before
    mlp = TinyCNN()
    with pytest.raises(RuntimeError):
        with Taps(mlp, {"c": "features.*.0"}).capture():
            mlp(torch.randn(1, 5, 8, 8))  # wrong channel count: fails inside the forward
    assert all(len(m._forward_hooks) == 0 for m in mlp.modules())


def test_memory_flat_and_no_references_kept():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    taps = Taps(mlp, {"hid": "*", "first": "0", "second_in": "2:input"})
    x = torch.randn(8, 16)

    def step():
        with taps.capture() as store:
            loss = mlp(x).sum() + sum(t.sum() for t in store["hid"])
        loss.backward()
        return store

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    for _ in range(20):
        step()
    store = step()
    ref = weakref.ref(store["first"])
    assert len(store["hid"]) == 5
    del store
    gc.collect()
    assert ref() is None, "a captured tensor outlived the store"
    baseline = live_tensors()
    for _ in range(1000):
        step()
    assert live_tensors() <= baseline
    assert all(len(m._forward_hooks) == 0 for m in mlp.modules())
    # the glob list entries die with the store too
    with taps.capture() as store:
        mlp(x)
    refs = [weakref.ref(t) for t in store["hid"]]
    del store
    gc.collect()
    assert all(r() is None for r in refs)


def test_missing_capture_warns(llama, caplog):
    taps = Taps(llama, {"m": "model.layers.0.mlp", "hs": "hidden_states"})
    with caplog.at_level(logging.WARNING, logger="kdforge"):
        with taps.capture():
            pass  # no forward
    assert any("captured nothing" in r.getMessage() and "'m'" in r.getMessage() for r in caplog.records)
    assert not any("'hs'" in r.getMessage() for r in caplog.records)


def test_collect_outputs_after_the_block_is_silent(llama, ids, caplog):
    # kdforge.teachers.live collects HF outputs after leaving the capture block
    taps = Taps(llama, {"m": "model.layers.0.mlp", "hs": "hidden_states.1"})
    with caplog.at_level(logging.WARNING, logger="kdforge"):
        with taps.capture() as store:
            out = llama(input_ids=ids, **taps.needs_hf_outputs())
        taps.collect_outputs(store, out)
    assert not caplog.records
    assert torch.equal(store["hs"], out.hidden_states[1])


# --- wrappers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gloo_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    yield dist
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_wrapped_model_uses_unwrapped_paths(gloo_group, ids):
    model = tiny_llama()
    ddp = nn.parallel.DistributedDataParallel(model)
    assert unwrap_model(ddp) is model
    assert list_module_paths(ddp) == list_module_paths(model)
    taps = Taps(ddp, {"mlp": "model.layers.1.mlp", "layers": "model.layers.*", "hs": "hidden_states.1"})
    with taps.capture() as store:
        out = ddp(input_ids=ids, **taps.needs_hf_outputs())
        taps.collect_outputs(store, out)
    ref = model(input_ids=ids, output_hidden_states=True)
    assert len(store["layers"]) == N_LAYERS
    assert torch.allclose(store["hs"], ref.hidden_states[1])
    assert torch.allclose(store["layers"][0], ref.hidden_states[1])
    assert store["mlp"].requires_grad
    with pytest.raises(ValueError, match="matches no module of LlamaForCausalLM; closest: model.layers.1.mlp"):
        Taps(ddp, {"x": "module.model.layerz.1.mlp"})


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp_and_checkpoint_wrapped_names(gloo_group):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    net = TinyCNN()
    net.features[1] = checkpoint_wrapper(net.features[1])
    plain = list_module_paths(TinyCNN())
    assert list_module_paths(net) == plain
    fsdp = FSDP(net, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({nn.Conv2d}))
    assert any("_fsdp_wrapped_module" in n for n, _ in fsdp.named_modules())
    assert list_module_paths(fsdp) == plain
    taps = Taps(fsdp, {"convs": "features.*.0", "bn1": "features.1.1"})
    x = torch.randn(2, 3, 8, 8)
    with taps.capture() as store:
        fsdp(x)
    assert [t.shape[1] for t in store["convs"]] == [4, 8, 8]
    assert store["bn1"].shape == (2, 8, 8, 8)


def test_torch_compile_names_and_capture(caplog):
    import torch._dynamo

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    compiled = torch.compile(net, backend="eager")
    x = torch.randn(2, 4)
    assert list_module_paths(compiled) == ["0", "1", "2"]
    with caplog.at_level(logging.WARNING, logger="kdforge"):
        Taps(compiled, {"a": "0"})
    assert any("skip_nnmodule_hook_guards" in r.getMessage() for r in caplog.records)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        compiled(x)
        taps = Taps(compiled, {"a": "0", "both": "*"})
        for _ in range(2):
            with taps.capture() as store:
                compiled(x)
            assert torch.allclose(store["a"], net[0](x))
            assert len(store["both"]) == 3
    torch._dynamo.reset()


# --- other architectures ----------------------------------------------------------


def test_cnn_taps_and_inplace_clone():
    torch.manual_seed(0)
    net = TinyCNN(inplace=True).eval()
    x = torch.randn(2, 3, 8, 8)
    specs = {"blocks": "features.*", "convs": "features.*.0", "bn0": "features.0.1", "head_in": "head:input"}
    with Taps(net, specs).capture() as store:
        y = net(x)
    assert [t.shape for t in store["blocks"]] == [(2, 4, 8, 8), (2, 8, 8, 8), (2, 8, 8, 8)]
    assert len(store["convs"]) == 3 and store["head_in"].shape == (2, 8)
    assert torch.equal(store["blocks"][-1].mean(dim=(2, 3)), store["head_in"])
    assert torch.allclose(net.head(store["head_in"]), y)
    # the in-place ReLU overwrote the BatchNorm output; clone=True keeps the pre-activation
    assert (store["bn0"] >= 0).all()
    with Taps(net, {"bn0": "features.0.1"}, clone=True).capture() as store:
        net(x)
    assert (store["bn0"] < 0).any()


def test_gpt2_tiny():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 6))
    taps = Taps(model, {"mlp": "transformer.h.*.mlp", "blocks": "transformer.h.*", "hs": "hidden_states"})
    with taps.capture() as store:
        out = model(input_ids=ids, **taps.needs_hf_outputs())
        taps.collect_outputs(store, out)
    assert len(store["mlp"]) == 2 and store["mlp"][0].shape == (2, 6, 32)
    assert len(store["hs"]) == 3
    assert torch.equal(store["hs"][1], store["blocks"][0])


def test_bert_tiny():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = BertForMaskedLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 6))
    taps = Taps(
        model,
        {"out": "bert.encoder.layer.*.output", "q": "bert.encoder.layer.*.attention.self.query",
         "hs": "hidden_states", "att": "attentions.1"},
    )
    with taps.capture() as store:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **taps.needs_hf_outputs())
        taps.collect_outputs(store, out)
    assert len(store["out"]) == 2 and len(store["q"]) == 2
    assert torch.allclose(store["hs"][1], store["out"][0])
    assert torch.allclose(store["att"].sum(-1), torch.ones(2, 4, 6), atol=1e-5)


def test_describe_collapses_layers(llama):
    text = describe(llama)
    assert text.splitlines()[0].startswith("LlamaForCausalLM:")
    assert any(line.startswith("model.layers.*.mlp ") and line.endswith(f"x{N_LAYERS}") for line in text.splitlines())
    assert len(describe(llama, max_lines=3).splitlines()) == 5  # header + 3 + ellipsis
    assert "model.layers.2.mlp.up_proj" in describe(llama, max_lines=None, collapse=False)


def test_negative_layer_index_names_the_last_layer():
    from kdforge.models import tiny_llama
    from kdforge.taps import Taps

    model = tiny_llama(vocab_size=32, hidden=16, layers=3, heads=2)
    taps = Taps(model, {"last": "model.layers.-1.mlp", "first": "model.layers.-3.mlp"})
    ids = torch.randint(0, 32, (1, 5))
    with taps.capture() as store:
        out = model(input_ids=ids, output_hidden_states=True)
    ref = {}
    h = model.model.layers[2].mlp.register_forward_hook(lambda m, a, o: ref.setdefault("last", o))
    model(input_ids=ids)
    h.remove()
    torch.testing.assert_close(store["last"], ref["last"])
    assert store["first"].shape == store["last"].shape
    with pytest.raises(ValueError, match="matches no module"):
        Taps(model, {"x": "model.layers.-4.mlp"})
