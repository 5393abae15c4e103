"""Offline teacher cache: exact round trips, size per token, resume, and refusal of caches that do not match."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from kdforge.errors import KDForgeError
from kdforge.losses.sparse import SparseLogits, log1mexp
from kdforge.teachers import cache as cache_mod
from kdforge.teachers.cache import CacheOptions, CachedTeacher, build_cache, decode_ids, encode_ids


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    from kdforge.models import load_teacher, load_tokenizer
    from kdforge.recipe import ModelSpec, parse_recipe
    from kdforge.train import tokenize_corpus

    spec = ModelSpec(model=str(tiny_assets["teacher"]))
    tok = load_tokenizer(spec)
    recipe = parse_recipe({"teacher": spec.model_dump(), "data": {
        "corpus": str(tiny_assets["train"]), "validation": [str(tiny_assets["val"])], "seq_len": 32}})
    blocks, _ = tokenize_corpus(recipe, tok)
    return {"teacher": load_teacher(spec), "tokenizer": tok, "ids": blocks.ids[:20], "spec": spec.model_dump()}


def _build(tiny, out, fuse=True, **opts):
    opts = {"k": 16, "shard_blocks": 8, "batch_size": 4, **opts}
    return build_cache(tiny["teacher"], tiny["tokenizer"], tiny["ids"], out, teacher_spec=tiny["spec"],
                       options=CacheOptions(**opts), fuse=fuse)


def _batch(ids, index):
    index = torch.as_tensor(index)
    return {"input_ids": ids[index], "attention_mask": torch.ones_like(ids[index]), "block_index": index}


def _by_id(sparse: SparseLogits, temperature: float):
    """(ids sorted, teacher log-probs in that order): the cache stores ids in id order, from_dense in rank order."""
    ids, order = sparse.ids.sort(dim=-1)
    log_p = sparse.logits.gather(-1, order) / temperature - sparse.logsumexp.unsqueeze(-1)
    return ids, log_p


@pytest.mark.parametrize("values,ids_format,tol", [("fp16", "plain", 2e-3), ("int8", "packed", 3e-3),
                                                   ("int6", "packed", 2e-2)])
def test_round_trip(tiny, tmp_path, values, ids_format, tol):
    temperature = 2.0
    _build(tiny, tmp_path, values=values, ids=ids_format, temperature=temperature, features=["hidden_states.1"])
    cached = CachedTeacher(tmp_path, blocks_ids=tiny["ids"], tokenizer=tiny["tokenizer"])
    batch = _batch(tiny["ids"], [3, 17, 9])  # crosses shards, out of order
    out = cached(batch, taps={"h1": "hidden_states.1"})
    with torch.no_grad():
        live = tiny["teacher"](input_ids=batch["input_ids"], output_hidden_states=True)
    ref = SparseLogits.from_dense(live.logits, 16, lse_temperature=temperature)
    got_ids, got_lp = _by_id(out.logits, temperature)
    ref_ids, ref_lp = _by_id(ref, temperature)
    assert torch.equal(got_ids, ref_ids)
    assert out.logits.lse_temperature == temperature
    assert (got_lp.exp() - ref_lp.exp()).abs().max() < tol  # probabilities
    tail = lambda lp: log1mexp(torch.logsumexp(lp.double(), dim=-1))  # noqa: E731
    torch.testing.assert_close(tail(got_lp), tail(ref_lp), rtol=2e-3, atol=1e-6)  # exact up to float16 logs
    ref_raw = ref.logits.gather(-1, ref.ids.sort(dim=-1).indices)
    got_raw = out.logits.logits.gather(-1, out.logits.ids.sort(dim=-1).indices)
    assert (got_raw - ref_raw).abs().max() < 0.05 + 30 * tol  # raw logits back, from the float16 logsumexp
    torch.testing.assert_close(out.features["h1"], live.hidden_states[1], rtol=2e-3, atol=2e-3)  # float16


def test_elias_fano_ids_round_trip_and_size():
    g = torch.Generator().manual_seed(0)
    for vocab, k in ((49152, 64), (128, 16), (128, 128), (300_000, 64), (7, 1)):
        ids = torch.rand(50, vocab, generator=g).topk(k).indices
        packed, order = encode_ids(ids, vocab)
        assert packed.shape == (50, cache_mod.packed_id_bytes(vocab, k))
        assert torch.equal(decode_ids(packed, k, vocab), ids.sort(-1).values)
        assert torch.equal(ids.gather(-1, order), ids.sort(-1).values)
    assert cache_mod.packed_id_bytes(49152, 64) == 92  # vs 128 as uint16


def _direct(logits: torch.Tensor, k: int, temperature: float):
    """The cached quantities computed directly, in float64: top-k log-probs, ids, logsumexp and log tail mass."""
    scaled = logits.double() / temperature
    lse = torch.logsumexp(scaled, dim=-1)
    top_vals, top_ids = scaled.topk(k, dim=-1)
    log_rest = torch.logsumexp(scaled.scatter(-1, top_ids, float("-inf")), dim=-1) - lse
    return top_vals - lse.unsqueeze(-1), top_ids, lse, log_rest


def _logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[0, 5] = 200.0  # a certain token: its tail underflows float32 and takes the exact fallback
    logits[1, : vocab // 2] = float("-inf")  # half the vocabulary masked
    return logits


@pytest.mark.parametrize("vocab,k,temperature", [(49152, 64, 1.0), (50257, 64, 2.0), (128, 16, 0.5), (300, 300, 1.0)])
def test_top_k_log_probs_equal_a_direct_computation(vocab, k, temperature):
    logits = _logits(37, vocab)
    log_p, ids, lse, log_rest = cache_mod.top_k_log_probs(logits, k, temperature)
    ref_lp, ref_ids, ref_lse, ref_rest = _direct(logits, k, temperature)
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)  # the same top-k ids...
    assert torch.equal(logits.gather(-1, ids), logits.gather(-1, ref_ids))  # ...in the same (rank) order
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(log_p.double(), ref_lp, rtol=1e-6, atol=1e-5)
    if k < vocab:
        torch.testing.assert_close(log_rest.double(), ref_rest, rtol=1e-6, atol=1e-5)
        assert -1000 < log_rest[0] < -60  # a tail mass below float32's range: exact, not 0 (-inf)
    else:
        assert torch.equal(log_rest, torch.full_like(log_rest, float("-inf")))


@pytest.mark.parametrize("values,ids_format", [("int6", "packed"), ("fp16", "plain")])
def test_cache_contents_equal_a_direct_computation(values, ids_format):
    """The shard arrays at k=64, V=49,152 against the codecs applied to the float64 direct computation."""
    n, seq, vocab, k, temperature = 2, 24, 49152, 64, 2.0
    logits = _logits(n * seq, vocab).reshape(n, seq, vocab)
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(1))
    options = CacheOptions(k=k, values=values, ids=ids_format, temperature=temperature)
    got = cache_mod.encode_block_outputs(logits, {}, ids, options)
    ref_lp, ref_ids, ref_lse, ref_rest = _direct(logits.reshape(n * seq, vocab), k, temperature)
    if ids_format == "packed":
        packed, order = encode_ids(ref_ids, vocab)
        assert np.array_equal(got["ids"].reshape(n * seq, -1), packed)
        ref_lp = ref_lp.gather(-1, order)
    else:
        assert np.array_equal(got["ids"].reshape(n * seq, k), ref_ids.numpy().astype(np.uint16))
    ref_values = cache_mod.encode_values(ref_lp.float(), values)
    if values == "fp16":
        torch.testing.assert_close(torch.from_numpy(got["values"]).reshape(n * seq, k).float(),
                                   torch.from_numpy(ref_values["values"]).float(), rtol=2 ** -10, atol=0)
    else:  # the same codes and per-token scales, up to float32 rounding at a code boundary
        q = cache_mod.unpack_bits(got["values"].reshape(n * seq, -1), k, 6)
        ref_q = cache_mod.unpack_bits(ref_values["values"], k, 6)
        assert np.abs(q - ref_q).max() <= 1 and (q == ref_q).mean() > 0.999
        torch.testing.assert_close(torch.from_numpy(got["scale"]).reshape(n * seq, 2).float(),
                                   torch.from_numpy(ref_values["scale"]).float(), rtol=2 ** -10, atol=0)
    for name, ref in (("logsumexp", ref_lse), ("log_rest", ref_rest)):  # float16: equal up to its last bit
        torch.testing.assert_close(torch.from_numpy(got[name]).reshape(-1).float(), ref.float(), rtol=2 ** -10,
                                   atol=0)
    assert bytes(got["block_hash"][1]) == cache_mod.block_hash(ids[1])


def _softcapped_gemma2():
    """A tiny Gemma 2 whose final_logit_softcapping bites: raw logits up to ~0.4, capped at 0.05."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.05)
    return Gemma2ForCausalLM(config).eval()


def _shards(path):
    from safetensors.torch import load_file

    files = [load_file(path / e["file"]) for e in json.loads((path / "index.json").read_text())["shards"]]
    return {key: torch.cat([f[key] for f in files]) for key in files[0]}


@pytest.mark.parametrize("model,fuse", [("llama", True), ("llama", False), ("gemma2-softcap", True)])
def test_built_cache_equals_a_direct_computation(tiny, tmp_path, model, fuse):
    """build_cache (fused: logits a few rows at a time from the last hidden states; or the full logits) against the
    float64 direct computation on the model's own float64 logits, soft-cap included."""
    import copy

    teacher = tiny["teacher"] if model == "llama" else _softcapped_gemma2()
    vocab, k, temperature = teacher.config.vocab_size, 16, 0.5
    ids = tiny["ids"][:10] % vocab
    options = CacheOptions(k=k, values="fp16", ids="plain", lse_dtype="float32", temperature=temperature,
                           shard_blocks=4, batch_size=3, features=["hidden_states.1"])
    build_cache(teacher, tiny["tokenizer"], ids, tmp_path, teacher_spec=tiny["spec"], options=options, fuse=fuse)
    got = _shards(tmp_path)
    with torch.no_grad():
        out = copy.deepcopy(teacher).double()(input_ids=ids, output_hidden_states=True)
    assert model == "llama" or out.logits.abs().max() <= 0.05  # the cap is on
    logits = out.logits.reshape(-1, vocab)
    _, ref_ids, ref_lse, ref_rest = _direct(logits, k, temperature)
    got_ids = got["ids"].reshape(-1, k).long()
    assert torch.equal(got_ids.sort(-1).values, ref_ids.sort(-1).values)
    ref_lp = logits.gather(-1, got_ids) / temperature - ref_lse.unsqueeze(-1)  # in the cache's (id) order
    torch.testing.assert_close(got["values"].reshape(-1, k).double(), ref_lp, rtol=2 ** -10, atol=0)
    torch.testing.assert_close(got["logsumexp"].reshape(-1).double(), ref_lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["log_rest"].reshape(-1).double(), ref_rest, rtol=2 ** -10, atol=0)
    torch.testing.assert_close(got["feature.0"].double(), out.hidden_states[1], rtol=2e-3, atol=2e-3)  # float16


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_fused_build_never_makes_the_whole_batch_of_logits(tiny, tmp_path, monkeypatch, kernel):
    """With taps inside the base model, the fused build makes the logits a tile (native kernel) or a chunk of rows
    (torch path) at a time, never the batch's whole [B*T, V]; the cache equals the unfused one."""
    teacher = tiny["teacher"]
    vocab = teacher.config.vocab_size
    seen = []
    if kernel == "native":
        if not cache_mod.native.available():
            pytest.skip("no C compiler: the native kernel is not built here")
        monkeypatch.setattr(cache_mod, "_TILE_ROWS", 40)  # tiles of 40 rows x 100 of the vocabulary's columns
        monkeypatch.setattr(cache_mod, "_TILE_COLS", 100)
        rows = 40 * torch.get_num_threads()  # the build's tile rows: 40 per thread (read before, not after, it)
        update = cache_mod.native.TopKStream.update

        def one_tile_at_a_time(stream, tile, col0):
            assert tile.shape[0] <= 40 * torch.get_num_threads() and tile.shape[1] <= 100, tuple(tile.shape)
            seen.append(tuple(tile.shape))
            update(stream, tile, col0)

        monkeypatch.setattr(cache_mod.native.TopKStream, "update", one_tile_at_a_time)
    else:
        monkeypatch.setattr(cache_mod.native, "available", lambda: False)
        monkeypatch.setattr(cache_mod, "_CHUNK_BYTES", 8 * 4 * vocab)  # 8-row chunks, made
        monkeypatch.setattr(cache_mod, "_FUSED_CHUNKS", 1)  # ...as many per head call as make >= D = 48 rows
        chunk_rows = teacher.config.hidden_size

        def one_chunk_at_a_time(module, args, output):
            rows = args[0].reshape(-1, args[0].shape[-1]).shape[0]
            assert rows <= chunk_rows, f"the lm head was called on {rows} rows, more than a chunk's {chunk_rows}"
            seen.append(rows)

        handle = teacher.get_output_embeddings().register_forward_hook(one_chunk_at_a_time)
    features = ["hidden_states.2", "model.layers.0.mlp"]
    try:
        _build(tiny, tmp_path / "fused", features=features, fuse=True)
    finally:
        if kernel == "torch":
            handle.remove()
    if kernel == "native":  # 5 batches of 128 rows, each in tiles covering every column
        assert sum(r * c for r, c in seen) == 5 * 4 * 32 * vocab, seen
        assert max(r for r, _ in seen) == min(rows, 128), (rows, seen)
    else:
        assert chunk_rows == 48 and seen.count(48) == 5 * (4 * 32 // 48)  # 5 batches of 128 rows: fused path ran
    monkeypatch.undo()
    unfused = tmp_path / "unfused"
    build_cache(teacher, tiny["tokenizer"], tiny["ids"], unfused, teacher_spec=tiny["spec"],
                options=CacheOptions(k=16, shard_blocks=8, batch_size=4, features=features), fuse=False)
    a, b = _shards(tmp_path / "fused"), _shards(unfused)
    assert a.keys() == b.keys()
    for key in a:
        if key == "values":  # int6 codes: equal up to float32 rounding at a code boundary
            q, ref_q = (cache_mod.unpack_bits(x[key].reshape(-1, x[key].shape[-1]).numpy(), 16, 6) for x in (a, b))
            assert np.abs(q - ref_q).max() <= 1 and (q == ref_q).mean() > 0.999
        else:
            torch.testing.assert_close(a[key], b[key], rtol=2 ** -10, atol=1e-6)


def test_fused_build_falls_back_for_taps_outside_the_base_model_and_other_models(tiny):
    from kdforge.taps import Taps

    teacher = tiny["teacher"]
    base, head, transform = cache_mod._fused_head(teacher, Taps(teacher, {"h": "hidden_states.1",
                                                                          "m": "model.layers.*.mlp"}))
    assert head is teacher.get_output_embeddings() and transform.is_identity
    assert cache_mod._fused_head(teacher, Taps(teacher, {"head": "lm_head"})) is None
    assert cache_mod._fused_head(teacher, Taps(teacher, {"z": "logits"})) is None
    assert cache_mod._fused_head(torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8)), None) is None


@pytest.mark.parametrize("values,ids_format,expected", [("int6", "packed", 148.125), ("int8", "packed", 164.125),
                                                        ("int8", "plain", 200.125), ("fp16", "plain", 260.125)])
def test_bytes_per_token_at_k64(values, ids_format, expected):
    """Payload per token for SmolLM2's 49,152-token vocabulary; the default stays within 150 bytes."""
    logits = torch.randn(1, 128, 49152) * 3
    arrays = cache_mod.encode_block_outputs(logits, {}, torch.zeros(1, 128, dtype=torch.long),
                                            CacheOptions(k=64, values=values, ids=ids_format))
    per_token = sum(a.nbytes for a in arrays.values()) / 128
    assert per_token == pytest.approx(expected)
    if (values, ids_format) == (CacheOptions.values, CacheOptions.ids):
        assert per_token <= 150
    if ids_format == "plain":
        assert arrays["ids"].dtype == np.uint16


def test_index_records_what_was_cached(tiny, tmp_path):
    index = _build(tiny, tmp_path)
    meta = index["meta"]
    assert meta["data"]["seq_len"] == 32 and meta["data"]["n_blocks"] == 20 and len(meta["data"]["sha256"]) == 64
    assert meta["tokenizer"]["size"] == len(tiny["tokenizer"]) and meta["vocab_size"] == 128
    assert meta["options"]["k"] == 16 and meta["teacher"]["model"] == tiny["spec"]["model"]
    assert index["complete"] and index["bytes_per_token"] > 0
    assert [s["start"] for s in index["shards"]] == [0, 8, 16] and all(len(s["sha256"]) == 64 for s in index["shards"])
    assert json.loads((tmp_path / "index.json").read_text()) == json.loads(json.dumps(index))


def test_killed_run_resumes_without_redoing_finished_shards(tiny, tmp_path, monkeypatch):
    real_save = cache_mod._save_shard
    calls = []

    def dies_on_second_shard(arrays, meta):
        calls.append(meta["start"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(arrays, meta)

    monkeypatch.setattr(cache_mod, "_save_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny, tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    assert not index["complete"] and [s["shard"] for s in index["shards"]] == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "shard_00000.safetensors"]  # no temp left
    with pytest.raises(KDForgeError, match="incomplete"):
        CachedTeacher(tmp_path)
    first = tmp_path / "shard_00000.safetensors"
    os.utime(first, ns=(1, 1))
    monkeypatch.setattr(cache_mod, "_save_shard", lambda a, m: calls.append(m["start"]) or real_save(a, m))
    calls.clear()
    _build(tiny, tmp_path)
    assert calls == ["8", "16"]  # shard 0 was neither recomputed nor rewritten
    assert first.stat().st_mtime_ns == 1
    reference = tmp_path / "ref"
    _build(tiny, reference)
    from safetensors.torch import load_file

    for name in ("shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"):
        a, b = load_file(tmp_path / name), load_file(reference / name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_truncated_or_corrupt_shard_is_refused(tiny, tmp_path):
    _build(tiny, tmp_path)
    shard = tmp_path / "shard_00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(KDForgeError, match="shard_00001.safetensors has .* bytes.*truncated"):
        CachedTeacher(tmp_path)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(KDForgeError, match="sha256"):
        CachedTeacher(tmp_path)
    _build(tiny, tmp_path)  # a rerun repairs the damaged shard
    CachedTeacher(tmp_path)


def test_mismatched_data_tokenizer_or_settings_are_refused(tiny, tmp_path):
    _build(tiny, tmp_path)
    ids = tiny["ids"]
    with pytest.raises(KDForgeError, match="training data \\(same size, different tokens or order\\)"):
        CachedTeacher(tmp_path, blocks_ids=ids.flip(0))
    with pytest.raises(KDForgeError, match="training data \\(20 blocks cached, this run has 19\\)"):
        CachedTeacher(tmp_path, blocks_ids=ids[:19])
    with pytest.raises(KDForgeError, match="data.seq_len \\(cache 32, this run 16\\)"):
        CachedTeacher(tmp_path, blocks_ids=ids[:, :16])
    other = type(tiny["tokenizer"]).from_pretrained(tiny["spec"]["model"])
    other.add_tokens(["zzyzx"])
    with pytest.raises(KDForgeError, match="does not match this run: tokenizer"):
        CachedTeacher(tmp_path, tokenizer=other)
    with pytest.raises(KDForgeError, match="vocabulary size"):
        CachedTeacher(tmp_path, vocab_size=100)
    with pytest.raises(KDForgeError, match="holds a teacher cache of something else: k \\(cache 16, this run 8\\)"):
        _build(tiny, tmp_path, k=8)
    cached = CachedTeacher(tmp_path, blocks_ids=ids, tokenizer=tiny["tokenizer"], vocab_size=128)
    with pytest.raises(KDForgeError, match="row 1 does not hold the tokens of cached block 5"):
        cached({"input_ids": ids[[4, 6]], "block_index": torch.tensor([4, 5])})
    with pytest.raises(KDForgeError, match="block_index"):
        cached({"input_ids": ids[[4]]})
    with pytest.raises(KDForgeError, match="no feature 'hidden_states.2'"):
        cached(_batch(ids, [0]), taps={"h": "hidden_states.2"})


TEMPERATURE, K = 2.0, 16


def _objective(missing_mass):
    return [{"loss": "cross_entropy", "weight": 0.5},
            {"loss": "forward_kl", "weight": 0.5, "temperature": TEMPERATURE, "missing_mass": missing_mass}]


@pytest.fixture(scope="module")
def recipe_cache(tiny_assets, tmp_path_factory):
    """A small tiny-asset recipe (64 training blocks) and a float16 top-16 cache of its teacher at T=2."""
    from kdforge.recipe import parse_recipe
    from kdforge.teachers.cache import cache_recipe_teacher

    root = tmp_path_factory.mktemp("recipe_cache")
    recipe = {
        "seed": 0, "output_dir": str(root / "run"), "teacher": {"model": str(tiny_assets["teacher"])},
        "student": {"init": "config", "config": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}},
        "data": {"corpus": str(tiny_assets["train"]), "validation": [str(tiny_assets["val"])], "seq_len": 32,
                 "max_train_tokens": 2048, "max_eval_tokens": 512},
        "objective": _objective("bucket"),
        "train": {"steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "save_every": 0, "log_every": 1},
    }
    path, index = cache_recipe_teacher(parse_recipe(recipe), out=root / "cache", options=CacheOptions(
        k=K, values="fp16", temperature=TEMPERATURE, batch_size=8, shard_blocks=16))
    assert index["complete"] and len(index["shards"]) == 4
    return recipe, path


@pytest.mark.parametrize("missing_mass", ["renormalize", "bucket"])
def test_cached_teacher_loss_equals_the_live_sparse_loss(recipe_cache, missing_mass):
    """Plain and chunked logit paths: the distiller on the cache gives forward_kl of the live teacher's top-k."""
    from kdforge.data.packing import make_batch
    from kdforge.losses.logits import forward_kl
    from kdforge.recipe import parse_recipe
    from kdforge.train import prepare

    recipe, path = recipe_cache
    live = prepare(parse_recipe({**recipe, "objective": _objective(missing_mass)}))
    teacher = {**recipe["teacher"], "kind": "cache", "path": str(path)}
    for chunk in (None, 24):
        cached = parse_recipe({**recipe, "objective": _objective(missing_mass), "teacher": teacher,
                               "train": {**recipe["train"], "logit_chunk_size": chunk}})
        setup = prepare(cached, tokenizer=live.tokenizer)
        assert setup.teacher is None  # training never loads the teacher's weights
        batch = make_batch(setup.train_blocks, torch.tensor([5, 0, 63]))
        _, values = setup.distiller(batch)
        with torch.no_grad():
            t_logits = live.teacher(input_ids=batch["input_ids"]).logits[:, :-1]
            s_logits = live.student(input_ids=batch["input_ids"]).logits[:, :-1]
        direct = forward_kl(s_logits, SparseLogits.from_dense(t_logits, K, lse_temperature=TEMPERATURE),
                            temperature=TEMPERATURE, missing_mass=missing_mass)
        torch.testing.assert_close(values["forward_kl"], direct, rtol=2e-3, atol=2e-4)


def test_training_from_the_cache_end_to_end(recipe_cache, tmp_path):
    from kdforge.recipe import parse_recipe
    from kdforge.train import train

    recipe, path = recipe_cache
    cached = parse_recipe({**recipe, "output_dir": str(tmp_path / "run"), "train": {
        **recipe["train"], "logit_chunk_size": 40}, "teacher": {**recipe["teacher"], "kind": "cache",
                                                                  "path": str(path)}})
    out = train(cached, progress=False)
    final = json.loads((out / "final.json").read_text())
    assert final["teacher"]["perplexity"] > 1 and 0 <= final["student"]["top1_agreement"] <= 1  # loaded for eval
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss/forward_kl"]) for r in rows)


def test_cached_recipe_refuses_other_data_and_temperature(recipe_cache):
    from kdforge.recipe import parse_recipe
    from kdforge.train import prepare

    recipe, path = recipe_cache
    teacher = {**recipe["teacher"], "kind": "cache", "path": str(path)}
    shorter = {**recipe["data"], "max_train_tokens": 1024}
    with pytest.raises(KDForgeError, match=r"does not match this run: training data \(64 blocks cached"):
        prepare(parse_recipe({**recipe, "teacher": teacher, "data": shorter}))
    hot = [{"loss": "forward_kl", "temperature": 4.0}]
    with pytest.raises(KDForgeError, match="uses temperature 4.0 but the teacher cache .* at 2.0"):
        prepare(parse_recipe({**recipe, "teacher": teacher, "objective": hot}))
    renorm = [{"loss": "forward_kl", "temperature": 4.0, "missing_mass": "renormalize"}]
    prepare(parse_recipe({**recipe, "teacher": teacher, "objective": renorm}))  # needs no logsumexp


def test_cli_cache_teacher(recipe_cache, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from kdforge.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_cache[0]))
    cmd = ["cache-teacher", str(recipe), "--k", "8", "--out", str(tmp_path / "c"), "--set", "data.max_train_tokens=512"]
    result = CliRunner().invoke(app, cmd)
    assert result.exit_code == 0, result.output
    assert "bytes/token" in result.output and (tmp_path / "c" / "index.json").is_file()
    bad = CliRunner().invoke(app, cmd[:2] + ["--k", "4"] + cmd[4:])
    assert bad.exit_code == 2 and "k (cache 8, this run 4)" in bad.output


def test_feature_terms_read_cached_teacher_features(recipe_cache, tmp_path):
    from kdforge.data.packing import make_batch
    from kdforge.recipe import parse_recipe
    from kdforge.teachers.cache import cache_recipe_teacher
    from kdforge.train import prepare

    recipe = {**recipe_cache[0], "data": {**recipe_cache[0]["data"], "max_train_tokens": 512}}
    recipe["objective"] = [{"loss": "cross_entropy"},
                           {"loss": "hidden_mse", "student": "hidden_states.2", "teacher": "hidden_states.3",
                            "projector": "linear"}]
    path, _ = cache_recipe_teacher(parse_recipe(recipe), out=tmp_path / "c", options=CacheOptions(
        k=4, features=["hidden_states.3"], batch_size=8))
    live = prepare(parse_recipe(recipe))
    cached = prepare(parse_recipe({**recipe, "teacher": {**recipe["teacher"], "kind": "cache", "path": str(path)}}),
                     tokenizer=live.tokenizer)
    cached.distiller.load_state_dict(live.distiller.state_dict())
    batch = make_batch(live.train_blocks, torch.tensor([3, 1]))
    torch.testing.assert_close(cached.distiller(batch)[1]["hidden_mse"], live.distiller(batch)[1]["hidden_mse"],
                               rtol=2e-3, atol=1e-4)  # float16 features
